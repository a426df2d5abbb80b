//! Shared by the matrix: the backend template, loop construction, per-test process
//! isolation for fork and signal tests, and small fixtures.
#![allow(dead_code, unused_macros)] // each test crate uses a different part

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forkloop::{Interest, Io, Kind, Loop};
use rstest_reuse::template;

/// The timing unit of looptests.md, in its quick mode.
pub const U: Duration = Duration::from_millis(100);

/// Every backend; the ones not compiled in or not usable here are ignored, with why.
#[template]
#[rstest]
#[cfg_attr(
    not(feature = "poll"),
    ignore = "poll backend not compiled in (feature `poll`)"
)]
#[case::poll(Kind::Poll)]
#[cfg_attr(
    not(feature = "select"),
    ignore = "select backend not compiled in (feature `select`)"
)]
#[case::select(Kind::Select)]
#[cfg_attr(
    not(has_epoll),
    ignore = "epoll backend not compiled in (feature `epoll`) or not on Linux"
)]
#[case::epoll(Kind::Epoll)]
#[cfg_attr(
    not(has_kqueue),
    ignore = "kqueue backend not compiled in (feature `kqueue`) or not on macOS/BSD"
)]
#[case::kqueue(Kind::Kqueue)]
#[cfg_attr(
    not(feature = "mio"),
    ignore = "mio backend not compiled in (feature `mio`)"
)]
#[case::mio(Kind::Mio)]
#[cfg_attr(
    not(feature = "polling"),
    ignore = "polling backend not compiled in (feature `polling`)"
)]
#[case::polling(Kind::Polling)]
pub fn backends(#[case] kind: Kind) {}

pub fn new_loop(kind: Kind) -> Loop {
    Loop::with_backend(kind).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// A shared counter for callbacks to bump: `(counter, clone for the callback)`.
pub fn counter() -> (Rc<Cell<u32>>, Rc<Cell<u32>>) {
    let c = Rc::new(Cell::new(0));
    (c.clone(), c)
}

pub fn bump(c: &Rc<Cell<u32>>) {
    c.set(c.get() + 1);
}

/// A connected, non-blocking socketpair.
pub fn socketpair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

/// Reads whatever is there without blocking.
pub fn drain(mut s: &UnixStream) -> usize {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while let Ok(n @ 1..) = s.read(&mut buf) {
        total += n;
    }
    total
}

/// A watch of `source` (which it owns: pass an `Rc` or a `try_clone` to keep using the
/// socket) that counts its calls: `(count, watch)`.
pub fn watch_counting<S: AsFd + 'static>(
    lp: &mut Loop,
    source: S,
    interest: Interest,
) -> (Rc<Cell<u32>>, Io<S>) {
    let (count, c) = counter();
    let watch = lp.watch_io(source, interest, move |_, (), _, _| bump(&c));
    (count, watch.unwrap())
}

/// Writes a byte into `peer`, iterates until `done()` (bounded), then drains `ours`:
/// the check that an inherited loop still works, repeated at every fork generation.
pub fn poke_until(
    lp: &mut Loop,
    ours: &UnixStream,
    peer: &UnixStream,
    done: impl Fn() -> bool,
) -> bool {
    (&*peer).write_all(b"x").unwrap();
    let ok = loop_until(lp, 50 * U, done);
    drain(ours);
    ok
}

/// Iterates `lp` until `done()` or `limit` passes; returns whether `done()` held.
pub fn loop_until(lp: &mut Loop, limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        lp.loop_once(Some(left), &mut ()).expect("loop_once");
    }
    true
}

const ISOLATED_ENV: &str = "FORKLOOP_ISOLATED_TEST";

/// Runs `body` in a process of its own: fork and process-wide signals are unsound
/// among the test harness's threads. The test binary is re-executed for exactly this
/// test, in a process group of its own; the parent checks, within a bound, that it ran
/// (was not filtered to nothing) and passed, then kills whatever the test left behind.
/// Output goes to files, so a straggler holding them open cannot stall the wait.
pub fn isolated(body: impl FnOnce()) {
    let name = std::thread::current()
        .name()
        .expect("libtest names test threads")
        .to_owned();
    if std::env::var(ISOLATED_ENV).as_deref() == Ok(name.as_str()) {
        body();
        return;
    }
    let log = |stream: &str| {
        let file = format!(
            "forkloop-{}-{}.{stream}",
            std::process::id(),
            name.replace("::", "-")
        );
        std::env::temp_dir().join(file)
    };
    let (out_path, err_path) = (log("out"), log("err"));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(ISOLATED_ENV, &name)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .process_group(0)
        .spawn()
        .expect("re-executing the test binary");
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx.recv_timeout(Duration::from_secs(60));
    // SAFETY: kill has no memory-safety preconditions; the group is the test's own.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let read = |path| {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        text
    };
    let (stdout, stderr) = (read(out_path), read(err_path));
    let status = match status {
        Ok(status) => status.expect("waiting for the isolated test"),
        Err(_) => panic!("isolated test {name} did not finish within 60 s:\n{stdout}\n{stderr}"),
    };
    // Figures a test reports ("figure: …") become this test's output (--show-output).
    for line in stdout
        .lines()
        .filter_map(|l| l.find("figure:").map(|at| &l[at..]))
    {
        println!("{line}");
    }
    assert!(
        status.success() && stdout.contains("1 passed"),
        "isolated test {name} failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}

/// Waits for child `pid` without a loop, bounded: polls `waitpid(WNOHANG)`, and kills
/// the child if it has not exited by `limit`. Returns the raw wait status.
pub fn wait_child(pid: libc::pid_t, limit: Duration) -> libc::c_int {
    let deadline = Instant::now() + limit;
    let mut status = 0;
    loop {
        // SAFETY: status is a live c_int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return status;
        }
        assert!(
            r == 0,
            "waitpid({pid}): {}",
            std::io::Error::last_os_error()
        );
        if Instant::now() > deadline {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("child {pid} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The exit code of a raw wait status, or a panic naming how the child died.
pub fn exit_code(status: libc::c_int) -> i32 {
    assert!(
        libc::WIFEXITED(status),
        "child did not exit normally: status {status:#x}"
    );
    libc::WEXITSTATUS(status)
}

/// A raw `fork()` (bypassing `Loop::fork`) whose child runs `f` and `_exit`s with its
/// result — 255 if it panics — so the child never returns into the test harness.
pub fn raw_fork(f: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the child runs `f` under catch_unwind and always _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(255);
        // SAFETY: ends the child without running the harness's destructors.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Raises the soft `RLIMIT_NOFILE` to at least `want` (up to the hard limit).
pub fn raise_fd_limit(want: u64) {
    // SAFETY: rlimit is plain old data filled by getrlimit.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: lim is a live rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if (lim.rlim_cur as u64) < want {
        lim.rlim_cur = (want as libc::rlim_t).min(lim.rlim_max);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
}

/// A custom backend that accepts every registration and never reports an event; its
/// `kernel_fd` is whatever the test says (and it never closes it).
pub struct Inert {
    pub kernel_fd: Option<i32>,
}

impl forkloop::Backend for Inert {
    fn name(&self) -> &'static str {
        "inert"
    }
    fn register(&mut self, _: i32, _: Interest) -> std::io::Result<()> {
        Ok(())
    }
    fn modify(&mut self, _: i32, _: Interest) -> std::io::Result<()> {
        Ok(())
    }
    fn deregister(&mut self, _: i32) -> std::io::Result<()> {
        Ok(())
    }
    fn wait(&mut self, _: &mut Vec<forkloop::Event>, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn post_fork(&mut self, _: &mut dyn Iterator<Item = (i32, Interest)>) -> std::io::Result<()> {
        Ok(())
    }
    fn kernel_fd(&self) -> Option<i32> {
        self.kernel_fd
    }
}
