//! Every compiled-in backend side by side with raw baselines (`cargo bench --all-features`
//! for all six; see BENCHMARKS.md). `FORKLOOP_BENCH_FULL=1` runs the full grid with
//! longer measurements; the default keeps `cargo bench` well under 15 minutes.
//! `FORKLOOP_BENCH_CLOCK=cpu` measures the bench thread's CPU time instead of wall time
//! (see [`Clock`]).
//! The raw epoll baseline makes this file Linux-only, like the machines it runs on.
#![cfg(target_os = "linux")]

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Throughput};
use forkloop::{ForkOptions, Interest, Kind, Loop};
use forkloop_bench_libev::Libev;

fn full() -> bool {
    std::env::var_os("FORKLOOP_BENCH_FULL").is_some()
}

/// What the benches measure: wall-clock time (criterion's own clock), or, with
/// `FORKLOOP_BENCH_CLOCK=cpu`, the bench thread's CPU time, user and system. On a
/// shared machine the CPU clock does not count the time the thread waits for its core
/// while other processes run, so side-by-side rows drift less. It does not count a
/// blocking wait either: it suits the groups whose iterations never block (event
/// processing, timers, interest: the events they wait for are already pending), not
/// fork-round-trip or children, whose work is in other processes.
struct Clock {
    id: libc::clockid_t,
}

type Criterion = criterion::Criterion<Clock>;

impl Clock {
    fn from_env() -> Clock {
        let cpu = std::env::var("FORKLOOP_BENCH_CLOCK").is_ok_and(|c| c == "cpu");
        let id = if cpu {
            libc::CLOCK_THREAD_CPUTIME_ID
        } else {
            libc::CLOCK_MONOTONIC // what Instant reads
        };
        Clock { id }
    }

    fn read(&self) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes the live timespec; both clock ids exist on Linux.
        unsafe { libc::clock_gettime(self.id, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

impl Measurement for Clock {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        self.read()
    }
    fn end(&self, start: Duration) -> Duration {
        self.read().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

/// A libev loop (epoll backend, bench-libev/), or `None` after saying loudly, once per
/// group, why its rows are missing: a machine without libev-dev still runs every other row.
fn libev(group: &str) -> Option<Libev> {
    match Libev::new() {
        Ok(ev) => Some(ev),
        Err(why) => {
            eprintln!("\n*** SKIPPED: the libev rows of {group}: {why} ***\n");
            None
        }
    }
}

fn kinds() -> Vec<Kind> {
    Kind::ALL
        .iter()
        .copied()
        .filter(|k| k.check_available().is_ok())
        .collect()
}

/// select(2) cannot hold fds at or above FD_SETSIZE; N sockets use about N + 10 fds.
fn fits(kind: Option<Kind>, n: usize) -> bool {
    kind != Some(Kind::Select) || n + 64 < libc::FD_SETSIZE
}

/// Raises RLIMIT_NOFILE for N = 10,000 (20,000 fds and more): to 65,536 where allowed
/// (root may raise the hard limit), else to the hard limit.
fn raise_fd_limit() {
    // SAFETY: rlimit is plain old data; getrlimit/setrlimit read and write it.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = libc::rlimit {
            rlim_cur: 65536,
            rlim_max: lim.rlim_max.max(65536),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Whether N sockets fit under the fd limit; says so when they do not.
fn sockets_fit(n: usize) -> bool {
    // SAFETY: as above.
    let limit = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur as usize
    };
    let needed = n + 256;
    if needed > limit {
        eprintln!("skipping N={n}: RLIMIT_NOFILE is {limit}, N needs {needed}");
    }
    needed <= limit
}

/// N watched sockets in N/2 connected pairs, non-blocking, and for each socket the fd
/// whose writes make it readable (its peer): N watched fds cost N fds, not 2N. Shared
/// (`Rc`): each loop's watches own a handle to the same sockets the raw baselines use.
fn sockets(n: usize) -> (Vec<Rc<UnixStream>>, Vec<RawFd>) {
    let mut ends = Vec::with_capacity(n);
    let mut peers = Vec::with_capacity(n);
    for _ in 0..n.div_ceil(2) {
        let (a, b) = UnixStream::pair().expect("socketpair (raise RLIMIT_NOFILE)");
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        peers.extend([b.as_raw_fd(), a.as_raw_fd()]);
        ends.extend([Rc::new(a), Rc::new(b)]);
    }
    (ends, peers)
}

fn write_byte(fd: RawFd) {
    // SAFETY: one byte from a static to a socket the bench owns.
    unsafe { libc::write(fd, b"e".as_ptr().cast(), 1) };
}

/// Reads what is there (up to 64 bytes): the bytes read.
fn read_some(fd: RawFd) -> usize {
    let mut buf = [0u8; 64];
    // SAFETY: reads into a live stack buffer of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    n.max(0) as usize
}

/// The libevent bench's per-event work, shared by every contender: read, count, and
/// forward one byte to the next pair while the round's write budget lasts.
struct Round {
    writers: Vec<RawFd>,
    read: Cell<usize>,
    left: Cell<usize>,
}

impl Round {
    fn on_readable(&self, fd: RawFd, index: usize) {
        self.read.set(self.read.get() + read_some(fd));
        if self.left.get() > 0 {
            self.left.set(self.left.get() - 1);
            write_byte(self.writers[(index + 1) % self.writers.len()]);
        }
    }

    /// Starts a round: A active pairs get a byte, and A more writes are allowed.
    fn start(&self, active: usize) {
        self.read.set(0);
        self.left.set(active);
        let spacing = self.writers.len() / active;
        for k in 0..active {
            write_byte(self.writers[k * spacing]);
        }
    }

    fn done(&self, active: usize) -> bool {
        self.read.get() >= 2 * active
    }
}

/// Whether each read watch keeps an idle timer that every event pushes back (as a
/// connection's idle timeout would), and how.
#[derive(Clone, Copy)]
enum Timeouts {
    None,
    /// Cancel the timer and arm a new one: the only way before `Loop::restart`, and the
    /// historical `event-processing+timeouts` figures (function ids `epoll`, `poll`, …).
    CancelAndArm,
    /// Move the pending timer in place with `Loop::restart` (libev's `ev_timer_again`):
    /// function ids `epoll+restart`, `poll+restart`, … in the same group.
    Restart,
}

const IDLE: Duration = Duration::from_secs(600);

/// A loop with a read watch on every reader, each with its idle timer if `timeouts`.
fn forkloop_setup(
    kind: Kind,
    readers: &[Rc<UnixStream>],
    round: &Rc<Round>,
    timeouts: Timeouts,
) -> Loop {
    let mut lp = Loop::with_backend(kind).unwrap();
    for (index, r) in readers.iter().enumerate() {
        let round = round.clone();
        let read = move |s: &Rc<UnixStream>| round.on_readable(s.as_raw_fd(), index);
        match timeouts {
            Timeouts::None => lp.watch_io(r.clone(), Interest::READ, move |_, (), s, _| read(s)),
            Timeouts::CancelAndArm => {
                let mut timer = lp.after(IDLE, |_, ()| {});
                lp.watch_io(r.clone(), Interest::READ, move |lp, (), s, _| {
                    read(s);
                    lp.cancel(timer);
                    timer = lp.after(IDLE, |_, ()| {});
                })
            }
            Timeouts::Restart => {
                let timer = lp.after(IDLE, |_, ()| {});
                lp.watch_io(r.clone(), Interest::READ, move |lp, (), s, _| {
                    read(s);
                    lp.restart(timer, IDLE);
                })
            }
        }
        .unwrap();
    }
    lp
}

/// The raw baselines: the same work over the syscall or crate directly.
enum Raw {
    Epoll(RawFd, Vec<libc::epoll_event>),
    /// raw-epoll with an idle deadline per fd, restarted on every event (the baseline of
    /// `event-processing+timeouts`).
    EpollHeap(RawFd, Vec<libc::epoll_event>, IdleHeap),
    Poll(Vec<libc::pollfd>),
    Select(Vec<RawFd>),
    Mio(mio::Poll, mio::Events),
    Polling(polling::Poller, polling::Events),
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Raw::Epoll(epfd, _) | Raw::EpollHeap(epfd, _, _) = self {
            // SAFETY: the epoll fd this baseline created; nothing else closes it.
            unsafe { libc::close(*epfd) };
        }
    }
}

/// The idle timeouts of `raw-epoll+heap`, as a C programmer would write them: a plain
/// binary heap of `(deadline, fd index)` and each fd's current deadline. Restarting a
/// timeout pushes a new entry and records the new deadline; an entry that is not its
/// fd's current deadline is stale and dropped when it reaches the top (lazy deletion).
/// Once stale entries outnumber the live ones (the same bound forkloop's timers keep,
/// src/timer.rs), the heap is filtered down to the live entries, so memory stays bounded.
struct IdleHeap {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
    /// `None` once the fd's timeout fired.
    deadlines: Vec<Option<Instant>>,
}

impl IdleHeap {
    fn new(n: usize) -> IdleHeap {
        let mut idle = IdleHeap {
            heap: BinaryHeap::with_capacity(n),
            deadlines: vec![None; n],
        };
        let deadline = Instant::now() + IDLE;
        for i in 0..n {
            idle.restart(i, deadline);
        }
        idle
    }

    fn restart(&mut self, i: usize, deadline: Instant) {
        self.deadlines[i] = Some(deadline);
        self.heap.push(Reverse((deadline, i)));
        if self.heap.len() > 2 * self.deadlines.len() + 1024 {
            let deadlines = &self.deadlines;
            self.heap.retain(|&Reverse((d, i))| deadlines[i] == Some(d));
        }
    }

    /// The nearest live deadline, dropping stale entries found on top.
    fn next(&mut self) -> Option<Instant> {
        while let Some(&Reverse((d, i))) = self.heap.peek() {
            if self.deadlines[i] == Some(d) {
                return Some(d);
            }
            self.heap.pop();
        }
        None
    }

    /// Fires the timeouts due at `now` (in the bench none is: IDLE is ten minutes).
    fn expire(&mut self, now: Instant) {
        while let Some(d) = self.next() {
            if d > now {
                break;
            }
            let Reverse((_, i)) = self.heap.pop().expect("peeked");
            self.deadlines[i] = None;
        }
    }
}

/// The epoll_wait timeout for a deadline: whole milliseconds, rounded up (as forkloop
/// rounds its timer waits).
fn wait_ms(deadline: Option<Instant>) -> i32 {
    deadline.map_or(-1, |d| {
        let ns = d.saturating_duration_since(Instant::now()).as_nanos();
        ns.div_ceil(1_000_000).min(i32::MAX as u128) as i32
    })
}

const RAW: [&str; 5] = [
    "raw-epoll",
    "raw-poll",
    "raw-select",
    "raw-mio",
    "raw-polling",
];

/// An epoll instance with a read registration per fd (its index as the key), and an
/// event buffer.
fn epoll_setup(fds: impl Iterator<Item = RawFd>) -> (RawFd, Vec<libc::epoll_event>) {
    // SAFETY: plain syscalls on fds the bench owns.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    for (i, fd) in fds.enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: as above.
        unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    }
    (epfd, vec![libc::epoll_event { events: 0, u64: 0 }; 256])
}

fn raw_setup(name: &str, readers: &[Rc<UnixStream>]) -> Raw {
    let fds = readers.iter().map(AsRawFd::as_raw_fd);
    match name {
        "raw-epoll" => {
            let (epfd, events) = epoll_setup(fds);
            Raw::Epoll(epfd, events)
        }
        "raw-epoll+heap" => {
            let (epfd, events) = epoll_setup(fds);
            Raw::EpollHeap(epfd, events, IdleHeap::new(readers.len()))
        }
        "raw-poll" => Raw::Poll(
            fds.map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect(),
        ),
        "raw-select" => Raw::Select(fds.collect()),
        "raw-mio" => {
            let poll = mio::Poll::new().unwrap();
            for (i, fd) in fds.enumerate() {
                let source = &mut mio::unix::SourceFd(&fd);
                poll.registry()
                    .register(source, mio::Token(i), mio::Interest::READABLE)
                    .unwrap();
            }
            Raw::Mio(poll, mio::Events::with_capacity(256))
        }
        _ => {
            let poller = polling::Poller::new().unwrap();
            for (i, fd) in fds.enumerate() {
                // SAFETY: every fd outlives the poller (both dropped at the bench's end).
                unsafe {
                    poller.add_with_mode(fd, polling::Event::readable(i), polling::PollMode::Level)
                }
                .unwrap();
            }
            Raw::Polling(poller, polling::Events::new())
        }
    }
}

/// One wait of a raw loop, dispatching to `round`.
fn raw_once(raw: &mut Raw, readers: &[RawFd], round: &Round) {
    match raw {
        Raw::Epoll(epfd, events) => {
            // SAFETY: the buffer is a live Vec of its length.
            let n =
                unsafe { libc::epoll_wait(*epfd, events.as_mut_ptr(), events.len() as i32, -1) };
            for ev in &events[..n.max(0) as usize] {
                let i = ev.u64 as usize;
                round.on_readable(readers[i], i);
            }
        }
        Raw::EpollHeap(epfd, events, idle) => {
            // Two clock reads per iteration, as the loop makes: one for the wait's
            // timeout, one after it for the deadlines the events restart.
            let timeout = wait_ms(idle.next());
            // SAFETY: the buffer is a live Vec of its length.
            let n = unsafe {
                libc::epoll_wait(*epfd, events.as_mut_ptr(), events.len() as i32, timeout)
            };
            let now = Instant::now();
            for ev in &events[..n.max(0) as usize] {
                let i = ev.u64 as usize;
                round.on_readable(readers[i], i);
                idle.restart(i, now + IDLE);
            }
            idle.expire(now);
        }
        Raw::Poll(fds) => {
            // SAFETY: the array is a live Vec of its length.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            for (i, pfd) in fds.iter().enumerate() {
                if pfd.revents != 0 {
                    round.on_readable(pfd.fd, i);
                }
            }
        }
        Raw::Select(fds) => {
            let set = select_readable(fds, None);
            for (i, &fd) in fds.iter().enumerate() {
                // SAFETY: `set` is a live fd_set, `fd` below FD_SETSIZE (fits()).
                if unsafe { libc::FD_ISSET(fd, &set) } {
                    round.on_readable(fd, i);
                }
            }
        }
        Raw::Mio(poll, events) => {
            poll.poll(events, None).unwrap();
            for ev in events.iter() {
                let i = ev.token().0;
                // Edge-triggered: drain before the next wait.
                round.on_readable(readers[i], i);
                while read_some(readers[i]) > 0 {}
            }
        }
        Raw::Polling(poller, events) => {
            events.clear();
            poller.wait(events, None).unwrap();
            for ev in events.iter() {
                round.on_readable(readers[ev.key], ev.key);
            }
        }
    }
}

/// One wait of a raw loop that does not block, and whose events (none, in setup) are
/// not dispatched.
fn raw_poll_now(raw: &mut Raw) {
    match raw {
        Raw::Epoll(epfd, events) | Raw::EpollHeap(epfd, events, _) => {
            // SAFETY: the buffer is a live Vec of its length.
            unsafe { libc::epoll_wait(*epfd, events.as_mut_ptr(), events.len() as i32, 0) };
        }
        Raw::Poll(fds) => {
            // SAFETY: the array is a live Vec of its length.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        }
        Raw::Select(fds) => {
            let mut zero = libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            };
            select_readable(fds, Some(&mut zero));
        }
        Raw::Mio(poll, events) => poll.poll(events, Some(Duration::ZERO)).unwrap(),
        Raw::Polling(poller, events) => {
            events.clear();
            poller.wait(events, Some(Duration::ZERO)).unwrap();
        }
    }
}

/// select(2) for reading on `fds` (every one below FD_SETSIZE: see `fits`), waiting up
/// to `timeout` (`None`: until one is ready); the set it reports ready.
fn select_readable(fds: &[RawFd], timeout: Option<&mut libc::timeval>) -> libc::fd_set {
    let timeout = timeout.map_or(std::ptr::null_mut(), |t| t as *mut libc::timeval);
    let none = std::ptr::null_mut();
    // SAFETY: fd_set is plain old data, every fd is below FD_SETSIZE, and `timeout` is
    // null or a live timeval.
    unsafe {
        let mut set: libc::fd_set = std::mem::zeroed();
        let mut max = 0;
        for &fd in fds {
            libc::FD_SET(fd, &mut set);
            max = max.max(fd);
        }
        libc::select(max + 1, &mut set, none, none, timeout);
        set
    }
}

fn grid() -> (Vec<usize>, Vec<usize>) {
    (vec![100, 1000, 10000], vec![1, 100])
}

fn event_processing(c: &mut Criterion) {
    raise_fd_limit();
    let (ns, actives) = grid();
    for with_timeouts in [false, true] {
        let (name, variants): (_, &[(Timeouts, &str)]) = if with_timeouts {
            let variants = &[
                (Timeouts::CancelAndArm, ""),
                (Timeouts::Restart, "+restart"),
            ];
            ("event-processing+timeouts", variants)
        } else {
            ("event-processing", &[(Timeouts::None, "")])
        };
        let mut group = c.benchmark_group(name);
        for &n in ns.iter().filter(|&&n| sockets_fit(n)) {
            for &active in &actives {
                let (readers, writers) = sockets(n);
                let reader_fds: Vec<RawFd> = readers.iter().map(AsRawFd::as_raw_fd).collect();
                let round = Rc::new(Round {
                    writers,
                    read: Cell::new(0),
                    left: Cell::new(0),
                });
                let param = format!("N={n}/A={active}");
                for kind in kinds().into_iter().filter(|&k| fits(Some(k), n)) {
                    for &(timeouts, suffix) in variants {
                        let mut lp = forkloop_setup(kind, &readers, &round, timeouts);
                        let id = BenchmarkId::new(format!("{}{suffix}", kind.name()), &param);
                        group.bench_function(id, |b| {
                            b.iter(|| {
                                round.start(active);
                                while !round.done(active) {
                                    lp.loop_once(None, &mut ()).unwrap();
                                }
                            })
                        });
                    }
                }
                // libev runs the same round in C (bench-libev/src/shim.c), its idle
                // timeouts pushed back with ev_timer_again, the counterpart of `+restart`.
                if let Some(mut ev) = libev(name) {
                    ev.watch_reads(&reader_fds, &round.writers, with_timeouts);
                    ev.run_nowait();
                    group.bench_function(BenchmarkId::new("libev", &param), |b| {
                        b.iter(|| ev.round(active))
                    });
                }
                let raws: Vec<&str> = if with_timeouts {
                    vec!["raw-epoll+heap"]
                } else {
                    RAW.into_iter()
                        .filter(|r| *r != "raw-select" || fits(Some(Kind::Select), n))
                        .collect()
                };
                for raw_name in raws {
                    let mut raw = raw_setup(raw_name, &readers);
                    group.bench_function(BenchmarkId::new(raw_name, &param), |b| {
                        b.iter(|| {
                            round.start(active);
                            while !round.done(active) {
                                raw_once(&mut raw, &reader_fds, &round);
                            }
                        })
                    });
                }
            }
        }
        group.finish();
    }
}

/// Setup: N read watches, then the first iteration, not waiting (none of the sockets
/// is readable). The iteration is part of it because that is where libev, and poll and
/// select, hand the fds to the kernel (ev_run; poll(2) and select(2) look at every fd
/// in every call), so every row, forkloop's included, pays for one.
fn setup_per_fd(c: &mut Criterion) {
    raise_fd_limit();
    let mut group = c.benchmark_group("setup");
    for n in [100, 1000, 10000].into_iter().filter(|&n| sockets_fit(n)) {
        let (readers, writers) = sockets(n);
        let reader_fds: Vec<RawFd> = readers.iter().map(AsRawFd::as_raw_fd).collect();
        group.throughput(Throughput::Elements(n as u64));
        for kind in kinds().into_iter().filter(|&k| fits(Some(k), n)) {
            group.bench_function(BenchmarkId::new(kind.name(), n), |b| {
                b.iter_batched(
                    || Loop::<()>::with_backend(kind).unwrap(),
                    |mut lp| {
                        for r in &readers {
                            lp.watch_io(r.clone(), Interest::READ, |_, (), _, _| {})
                                .unwrap();
                        }
                        lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
                        lp
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        // libev registers with the kernel when the loop next runs: the row includes one
        // ev_run(EVRUN_NOWAIT), as a loop's first iteration would.
        if libev("setup").is_some() {
            group.bench_function(BenchmarkId::new("libev", n), |b| {
                b.iter_batched(
                    || libev("setup").expect("made above"),
                    |mut ev| {
                        ev.watch_reads(&reader_fds, &writers, false);
                        ev.run_nowait();
                        ev
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        let raws = [
            "raw-epoll",
            "raw-mio",
            "raw-polling",
            "raw-poll",
            "raw-select",
        ];
        for raw_name in raws {
            if raw_name == "raw-select" && !fits(Some(Kind::Select), n) {
                continue;
            }
            group.bench_function(BenchmarkId::new(raw_name, n), |b| {
                b.iter_batched(
                    || (),
                    |()| {
                        let mut raw = raw_setup(raw_name, &readers);
                        raw_poll_now(&mut raw);
                        raw
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

/// `iters` rounds of `round`, which arms timers, fires them, and returns how long each
/// took: the sum of the `phase` ("arm" or "fire") part.
fn timed_phase(
    phase: &str,
    iters: u64,
    mut round: impl FnMut() -> (Duration, Duration),
) -> Duration {
    (0..iters)
        .map(|_| match (phase, round()) {
            ("arm", (arm, _)) => arm,
            (_, (_, fire)) => fire,
        })
        .sum()
}

fn timers(c: &mut Criterion) {
    let count: usize = if full() { 1_000_000 } else { 200_000 };
    // A fixed pseudo-random spread of deadlines over 0..10 ms.
    let delays: Vec<Duration> = (0..count as u64)
        .map(|i| Duration::from_nanos(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 10_000_000))
        .collect();
    let mut group = c.benchmark_group("timers");
    group.sample_size(10);
    group.throughput(Throughput::Elements(count as u64));
    for kind in kinds() {
        group.bench_function(
            BenchmarkId::new(kind.name(), format!("{count} one-shot")),
            |b| {
                let mut lp: Loop = Loop::with_backend(kind).unwrap();
                b.iter(|| {
                    // An Rc, not the loop's `&mut D`: each callback then captures what the
                    // raw heap's does, so both box the same closure.
                    let fired = Rc::new(Cell::new(0usize));
                    for &d in &delays {
                        let f = fired.clone();
                        lp.after(d, move |_, ()| f.set(f.get() + 1));
                    }
                    while fired.get() < count {
                        lp.loop_once(None, &mut ()).unwrap();
                    }
                })
            },
        );
    }
    // The same timers, the two phases timed apart (each iteration arms them all and
    // runs them all; `arm` times the first part, `fire` the second). Armed as libev
    // arms them (bench-libev: one ev_now_update, then ev_timer_start relative to
    // ev_now): one clock read, `update_now`, then `at(now + delay)` per timer, where
    // `after` outside a callback reads the clock for each. And the callback counts in
    // the loop's data, as libev's C callback counts in the shim's state: a closure that
    // captures nothing, which boxing does not allocate.
    let clock = Clock::from_env();
    for kind in kinds() {
        let mut lp: Loop<usize> = Loop::with_backend(kind).unwrap();
        for phase in ["arm", "fire"] {
            let id = BenchmarkId::new(kind.name(), format!("{count} {phase}"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    timed_phase(phase, iters, || {
                        let mut fired = 0;
                        let start = clock.read();
                        let now = lp.update_now();
                        for &d in &delays {
                            lp.at(now + d, |_, fired| *fired += 1);
                        }
                        let armed = clock.read();
                        while fired < count {
                            lp.loop_once(None, &mut fired).unwrap();
                        }
                        (armed - start, clock.read() - armed)
                    })
                })
            });
        }
    }
    // libev: ev_timer_init + ev_timer_start per timer (a preallocated ev_timer each, a C
    // callback counting), then ev_run until all fired.
    if let Some(mut ev) = libev("timers") {
        let seconds: Vec<f64> = delays.iter().map(Duration::as_secs_f64).collect();
        group.bench_function(
            BenchmarkId::new("libev", format!("{count} one-shot")),
            |b| {
                b.iter(|| {
                    ev.timers_arm(&seconds);
                    assert_eq!(ev.timers_fire(), count);
                })
            },
        );
        for phase in ["arm", "fire"] {
            let id = BenchmarkId::new("libev", format!("{count} {phase}"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    timed_phase(phase, iters, || {
                        let start = clock.read();
                        ev.timers_arm(&seconds);
                        let armed = clock.read();
                        assert_eq!(ev.timers_fire(), count);
                        (armed - start, clock.read() - armed)
                    })
                })
            });
        }
    }
    group.bench_function(
        BenchmarkId::new("raw-mio-heap", format!("{count} one-shot")),
        |b| {
            let mut poll = mio::Poll::new().unwrap();
            let mut events = mio::Events::with_capacity(16);
            b.iter(|| {
                let fired = Rc::new(Cell::new(0usize));
                let mut heap: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
                let mut callbacks: Vec<Option<Box<dyn FnOnce()>>> = Vec::with_capacity(count);
                let now = Instant::now();
                for (i, &d) in delays.iter().enumerate() {
                    let f = fired.clone();
                    callbacks.push(Some(Box::new(move || f.set(f.get() + 1))));
                    heap.push(Reverse((now + d, i)));
                }
                while let Some(&Reverse((deadline, _))) = heap.peek() {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    poll.poll(&mut events, Some(wait)).unwrap();
                    let now = Instant::now();
                    while let Some(&Reverse((deadline, i))) = heap.peek() {
                        if deadline > now {
                            break;
                        }
                        heap.pop();
                        if let Some(cb) = callbacks[i].take() {
                            cb();
                        }
                    }
                }
                assert_eq!(fired.get(), count);
            })
        },
    );
    let churn = 100_000;
    group.throughput(Throughput::Elements(churn));
    for kind in kinds() {
        group.bench_function(BenchmarkId::new(kind.name(), "100000 arm+cancel"), |b| {
            let mut lp: Loop = Loop::with_backend(kind).unwrap();
            b.iter(|| {
                for &d in &delays[..churn as usize] {
                    let w = lp.after(d + Duration::from_secs(60), |_, ()| {});
                    lp.cancel(w);
                }
            })
        });
        // The same deadline changes made in place: one pending timer, moved each time.
        group.bench_function(BenchmarkId::new(kind.name(), "100000 restart"), |b| {
            let mut lp: Loop = Loop::with_backend(kind).unwrap();
            let timer = lp.after(Duration::from_secs(60), |_, ()| {});
            b.iter(|| {
                for &d in &delays[..churn as usize] {
                    assert!(lp.restart(timer, d + Duration::from_secs(60)));
                }
            })
        });
    }
    group.finish();
}

/// One change to an IO watch, against the `epoll_ctl` calls it stands for on epoll:
/// `set_interest toggle` flips READ ↔ READ|WRITE (one iteration is one change, one
/// `EPOLL_CTL_MOD`), `pause+resume` is `DEL` then `ADD`, and `cancel+watch_io`, the
/// re-registration those two replace, is `DEL` then `ADD` and a new watch. Nothing
/// waits: the row is the change alone. The raw baseline makes the same calls on one
/// registered fd (its DEL+ADD is measured once per row). poll and select change a
/// table entry, and their `register` (on resume, in watch_io) checks that the fd is
/// open: one `fcntl`.
fn interest(c: &mut Criterion) {
    const TOGGLE: &str = "set_interest toggle";
    const PAUSE: &str = "pause+resume";
    const REWATCH: &str = "cancel+watch_io";
    let mut group = c.benchmark_group("interest");
    // A socketpair end is writable: WRITE interest is ready at once, as for a
    // connection with room in its send buffer.
    let (a, _peer) = UnixStream::pair().unwrap();
    let a = Rc::new(a);
    for kind in kinds() {
        let mut lp: Loop = Loop::with_backend(kind).unwrap();
        let mut io = lp
            .watch_io(a.clone(), Interest::READ, |_, (), _, _| {})
            .unwrap();
        let mut both = false;
        group.bench_function(BenchmarkId::new(kind.name(), TOGGLE), |b| {
            b.iter(|| {
                both = !both;
                let interest = if both {
                    Interest::READ | Interest::WRITE
                } else {
                    Interest::READ
                };
                lp.set_interest(io, interest).unwrap();
            })
        });
        lp.set_interest(io, Interest::READ).unwrap();
        group.bench_function(BenchmarkId::new(kind.name(), PAUSE), |b| {
            b.iter(|| {
                lp.pause(io).unwrap();
                lp.resume(io).unwrap();
            })
        });
        group.bench_function(BenchmarkId::new(kind.name(), REWATCH), |b| {
            b.iter(|| {
                lp.cancel(io);
                io = lp
                    .watch_io(a.clone(), Interest::READ, |_, (), _, _| {})
                    .unwrap();
            })
        });
    }
    let fd = a.as_raw_fd();
    let (epfd, _) = epoll_setup([fd].into_iter());
    let ctl = |op, events: libc::c_int| {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: 0,
        };
        // SAFETY: a live epoll_event, on the bench's own epoll instance and socket.
        let rc = unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
        assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    };
    let mut both = false;
    group.bench_function(BenchmarkId::new("raw-epoll", TOGGLE), |b| {
        b.iter(|| {
            both = !both;
            let events = if both {
                libc::EPOLLIN | libc::EPOLLOUT
            } else {
                libc::EPOLLIN
            };
            ctl(libc::EPOLL_CTL_MOD, events);
        })
    });
    ctl(libc::EPOLL_CTL_MOD, libc::EPOLLIN);
    for name in [PAUSE, REWATCH] {
        group.bench_function(BenchmarkId::new("raw-epoll", name), |b| {
            b.iter(|| {
                ctl(libc::EPOLL_CTL_DEL, 0);
                ctl(libc::EPOLL_CTL_ADD, libc::EPOLLIN);
            })
        });
    }
    // SAFETY: the epoll fd made above; nothing else closes it.
    unsafe { libc::close(epfd) };
    group.finish();
}

/// Re-registration of N fds, libev's "stop + start": each iteration pauses and resumes
/// every read watch (libev: `ev_io_stop` + `ev_io_start`; raw epoll: `EPOLL_CTL_DEL` +
/// `EPOLL_CTL_ADD`), then runs the loop once without waiting (`loop_once(Some(ZERO))`,
/// `ev_run(EVRUN_NOWAIT)`, `epoll_wait(0)`), which is when libev applies its changes.
/// `toggle` flips every watch between READ and READ|WRITE instead (set_interest; libev:
/// stop, `ev_io_set`, start; raw: `EPOLL_CTL_MOD`): one real change per fd, and the
/// write readiness it brings every other iteration, read (EAGAIN) by every contender's
/// callback. Throughput is per fd.
fn reregister(c: &mut Criterion) {
    raise_fd_limit();
    let mut group = c.benchmark_group("reregister");
    let ns: &[usize] = if full() {
        &[100, 1000, 10000]
    } else {
        &[100, 1000]
    };
    for &n in ns.iter().filter(|&&n| sockets_fit(n)) {
        let (readers, writers) = sockets(n);
        let reader_fds: Vec<RawFd> = readers.iter().map(AsRawFd::as_raw_fd).collect();
        group.throughput(Throughput::Elements(n as u64));
        for kind in kinds().into_iter().filter(|&k| fits(Some(k), n)) {
            let mut lp: Loop = Loop::with_backend(kind).unwrap();
            let ios: Vec<_> = readers
                .iter()
                .map(|r| {
                    lp.watch_io(r.clone(), Interest::READ, |_, (), s, _| {
                        read_some(s.as_raw_fd());
                    })
                    .unwrap()
                })
                .collect();
            let id = BenchmarkId::new(kind.name(), format!("{n} stop+start"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    for &io in &ios {
                        lp.pause(io).unwrap();
                        lp.resume(io).unwrap();
                    }
                    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
                })
            });
            let mut both = false;
            let id = BenchmarkId::new(kind.name(), format!("{n} toggle"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    both = !both;
                    let interest = if both {
                        Interest::READ | Interest::WRITE
                    } else {
                        Interest::READ
                    };
                    for &io in &ios {
                        lp.set_interest(io, interest).unwrap();
                    }
                    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
                })
            });
        }
        if let Some(mut ev) = libev("reregister") {
            ev.watch_reads(&reader_fds, &writers, false);
            ev.run_nowait();
            let id = BenchmarkId::new("libev", format!("{n} stop+start"));
            group.bench_function(id, |b| b.iter(|| ev.restart_all()));
            let mut both = false;
            let id = BenchmarkId::new("libev", format!("{n} toggle"));
            group.bench_function(id, |b| {
                b.iter(|| {
                    both = !both;
                    ev.toggle_all(both);
                })
            });
            ev.toggle_all(false);
        }
        let (epfd, mut events) = epoll_setup(reader_fds.iter().copied());
        events.resize(n.max(256), libc::epoll_event { events: 0, u64: 0 });
        let ctl = |op, fd, events: libc::c_int, key: usize| {
            let mut ev = libc::epoll_event {
                events: events as u32,
                u64: key as u64,
            };
            // SAFETY: a live epoll_event, on the bench's own epoll instance and sockets.
            unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
        };
        let wait = |events: &mut Vec<libc::epoll_event>| {
            // SAFETY: the buffer is a live Vec of its length.
            let got =
                unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, 0) };
            for ev in &events[..got.max(0) as usize] {
                read_some(reader_fds[ev.u64 as usize]);
            }
        };
        let id = BenchmarkId::new("raw-epoll", format!("{n} stop+start"));
        group.bench_function(id, |b| {
            b.iter(|| {
                for (i, &fd) in reader_fds.iter().enumerate() {
                    ctl(libc::EPOLL_CTL_DEL, fd, 0, i);
                    ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN, i);
                }
                wait(&mut events);
            })
        });
        let mut both = false;
        let id = BenchmarkId::new("raw-epoll", format!("{n} toggle"));
        group.bench_function(id, |b| {
            b.iter(|| {
                both = !both;
                let mask = if both {
                    libc::EPOLLIN | libc::EPOLLOUT
                } else {
                    libc::EPOLLIN
                };
                for (i, &fd) in reader_fds.iter().enumerate() {
                    ctl(libc::EPOLL_CTL_MOD, fd, mask, i);
                }
                wait(&mut events);
            })
        });
        // SAFETY: the epoll fd made above; nothing else closes it.
        unsafe { libc::close(epfd) };
    }
    group.finish();
}

fn signals(c: &mut Criterion) {
    let mut group = c.benchmark_group("signal-latency");
    for kind in kinds() {
        let mut lp: Loop = Loop::with_backend(kind).unwrap();
        let got = Rc::new(Cell::new(false));
        let g = got.clone();
        let watch = lp
            .watch_signal(libc::SIGUSR1, move |_, (), _| g.set(true))
            .unwrap();
        group.bench_function(kind.name(), |b| {
            b.iter(|| {
                got.set(false);
                // SAFETY: raise has no memory-safety preconditions.
                unsafe { libc::raise(libc::SIGUSR1) };
                while !got.get() {
                    lp.loop_once(None, &mut ()).unwrap();
                }
            })
        });
        lp.cancel(watch);
    }
    // After the loops' watches are gone: libev installs its own handler for SIGUSR1
    // (and restores the default when its loop goes).
    if let Some(mut ev) = libev("signal-latency") {
        ev.signal_start(libc::SIGUSR1);
        group.bench_function("libev", |b| b.iter(|| ev.signal_once()));
    }
    group.finish();
}

/// A loop with an idle read watch on each of `sockets`.
fn loop_watching(kind: Kind, sockets: &[Rc<UnixStream>]) -> Loop {
    let mut lp = Loop::with_backend(kind).unwrap();
    for s in sockets {
        lp.watch_io(s.clone(), Interest::READ, |_, (), _, _| {})
            .unwrap();
    }
    lp
}

fn fork(c: &mut Criterion) {
    raise_fd_limit();
    let mut round_trip = c.benchmark_group("fork-round-trip");
    round_trip.sample_size(20);
    let counts = [0, 1000, 10000];
    for &n in counts.iter().filter(|&&n| sockets_fit(n)) {
        let (readers, _) = sockets(n.max(2));
        for kind in kinds().into_iter().filter(|&k| fits(Some(k), n)) {
            let mut lp = loop_watching(kind, &readers[..n]);
            round_trip.bench_function(BenchmarkId::new(kind.name(), format!("{n} fds")), |b| {
                b.iter(|| {
                    let pid = lp
                        .fork(ForkOptions::new(), || {
                            Loop::with_global(|child| {
                                let once = child.loop_once(Some(Duration::ZERO), &mut ());
                                once.is_ok() as i32 - 1
                            })
                            .unwrap_or(1)
                        })
                        .unwrap();
                    lp.watch_process(pid, |lp, (), _, _| lp.stop(0)).unwrap();
                    lp.run(&mut ()).unwrap();
                })
            });
        }
        // libev: fork, the child's ev_loop_fork + ev_run(EVRUN_NOWAIT) (re-adding its n
        // fds to a new epoll) and _exit, the parent's waitpid. forkloop's child above
        // starts from a fresh loop (`Loop::fork`'s default: it inherits no watches).
        if let Some(mut ev) = libev_watching("fork-round-trip", &readers[..n]) {
            round_trip.bench_function(BenchmarkId::new("libev", format!("{n} fds")), |b| {
                b.iter(|| assert!(ev.fork_round_trip()))
            });
        }
    }
    round_trip.finish();
    // Re-init and one non-blocking iteration, what a child that keeps its parent's
    // watches does first: forkloop's `post_fork` (a new backend with every fd added
    // again), libev's ev_loop_fork (the same at its next ev_run).
    let mut post_fork = c.benchmark_group("post-fork");
    for &n in counts.iter().filter(|&&n| sockets_fit(n)) {
        let (readers, _) = sockets(n.max(2));
        for kind in kinds().into_iter().filter(|&k| fits(Some(k), n)) {
            let mut lp = loop_watching(kind, &readers[..n]);
            post_fork.bench_function(BenchmarkId::new(kind.name(), format!("{n} fds")), |b| {
                b.iter(|| {
                    lp.post_fork().unwrap();
                    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
                })
            });
        }
        if let Some(mut ev) = libev_watching("post-fork", &readers[..n]) {
            post_fork.bench_function(BenchmarkId::new("libev", format!("{n} fds")), |b| {
                b.iter(|| ev.post_fork_run())
            });
        }
    }
    post_fork.finish();
}

/// A libev loop watching `readers` (no per-fd timers), its first iteration run.
fn libev_watching(group: &str, readers: &[Rc<UnixStream>]) -> Option<Libev> {
    let mut ev = libev(group)?;
    let fds: Vec<RawFd> = readers.iter().map(|r| r.as_raw_fd()).collect();
    ev.watch_reads(&fds, &fds, false);
    ev.run_nowait();
    Some(ev)
}

fn children(c: &mut Criterion) {
    let mut group = c.benchmark_group("children");
    group.sample_size(10);
    group.throughput(Throughput::Elements(200));
    for kind in kinds() {
        // The children still to exit: the loop's `&mut D`.
        let mut lp: Loop<u32> = Loop::with_backend(kind).unwrap();
        group.bench_function(
            BenchmarkId::new(kind.name(), "200 spawned and reaped"),
            |b| {
                b.iter(|| {
                    for _ in 0..200 {
                        let pid = lp.fork(ForkOptions::new(), || 0).unwrap();
                        lp.watch_process(pid, |lp, left, _, _| {
                            *left -= 1;
                            if *left == 0 {
                                lp.stop(0);
                            }
                        })
                        .unwrap();
                    }
                    let mut left = 200;
                    lp.run(&mut left).unwrap();
                })
            },
        );
    }
    group.finish();
}

fn config() -> Criterion {
    let quick = !full();
    criterion::Criterion::default()
        .with_measurement(Clock::from_env())
        .warm_up_time(Duration::from_millis(if quick { 300 } else { 2000 }))
        .measurement_time(Duration::from_millis(if quick { 1000 } else { 5000 }))
        .sample_size(if quick { 20 } else { 100 })
}

criterion_group! {
    name = benches;
    config = config();
    targets = event_processing, setup_per_fd, timers, interest, reregister, signals, fork, children
}
criterion_main!(benches);
