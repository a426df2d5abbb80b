//! Runs `forkloop serve` as a real process and talks HTTP to it.
#![allow(dead_code)] // each test crate uses a different part

pub mod load;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// Every wait in these tests is bounded by this.
pub const LIMIT: Duration = Duration::from_secs(20);

pub struct Server {
    child: Option<Child>,
    pub addr: String,
    pub pid: libc::pid_t,
    lines: Receiver<String>,
    pub log: Vec<String>,
    /// When [`Server::wait_exit`] saw the master's exit.
    pub exited_at: Option<Instant>,
}

/// Starts `forkloop serve` on an ephemeral port with `args`, and waits for its ready line.
pub fn start(args: &[&str]) -> Server {
    ready(spawn(args))
}

/// Starts another program under forkloop's supervisor (an example, see [`example`])
/// with `args`, and waits for its ready line.
pub fn start_program(program: &std::path::Path, args: &[&str]) -> Server {
    let mut cmd = Command::new(program);
    cmd.args(args);
    ready(spawn_command(cmd))
}

/// Waits for the master's ready line, and takes the first listener's address from it.
fn ready(mut server: Server) -> Server {
    let line = server.wait_for("ready: listening on");
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("the ready line names the address")
        .trim_end_matches(',')
        .to_owned();
    server.addr = addr;
    server
}

/// The binary under test: this build's, or `FORKLOOP_TEST_BIN` (to run a suite against
/// another build, such as the one before a change).
pub fn binary() -> std::ffi::OsString {
    std::env::var_os("FORKLOOP_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_forkloop").into())
}

/// An example of the forkloop package, as this build made it: cargo builds them with
/// the workspace's tests (`cargo test --workspace --all-features`, or nextest), not
/// with this package's alone.
pub fn example(name: &str) -> std::path::PathBuf {
    let test = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> -> target/<profile>/examples/<name>
    let profile = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is not built: run the workspace's tests (cargo test --workspace --all-features), \
         or build it first (cargo build --all-features --example {name})",
        path.display()
    );
    path
}

/// Starts `forkloop serve` without waiting for it to become ready.
pub fn spawn(args: &[&str]) -> Server {
    let mut cmd = Command::new(binary());
    cmd.arg("serve");
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    if !args.contains(&"--workers") {
        cmd.args(["--workers", "2"]);
    }
    cmd.args(args);
    spawn_command(cmd)
}

/// Runs `cmd` in a process group of its own, its stderr read line by line.
pub fn spawn_command(mut cmd: Command) -> Server {
    cmd.env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    // A binary a test just wrote may still be open for writing in a child another
    // test thread is forking (ETXTBSY, until that child execs): try again.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            spawned => break spawned.expect("spawning the server"),
        }
    };
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let pid = child.id() as libc::pid_t;
    Server {
        child: Some(child),
        addr: String::new(),
        pid,
        lines,
        log: Vec::new(),
        exited_at: None,
    }
}

impl Server {
    /// Waits (bounded) for a log line containing `needle`, and returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        if let Some(line) = self.log.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + LIMIT;
        loop {
            let line = self.next_line(deadline, || format!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits (bounded) until `count` log lines contain `needle`.
    pub fn wait_for_count(&mut self, needle: &str, count: usize) {
        let deadline = Instant::now() + LIMIT;
        // Counted once, then line by line: a chatty server's log is long.
        let mut seen = self.count(needle);
        while seen < count {
            let line = self.next_line(deadline, || {
                format!("fewer than {count} log lines with {needle:?}")
            });
            seen += usize::from(line.contains(needle));
        }
    }

    /// The next log line (also kept in `log`), or a panic saying `what` failed once
    /// `deadline` has passed: checked for every line, as a chatty server's lines
    /// never let a wait time out.
    fn next_line(&mut self, deadline: Instant, what: impl Fn() -> String) -> String {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = self
            .lines
            .recv_timeout(left)
            .ok()
            .filter(|_| !left.is_zero());
        let Some(line) = line else {
            panic!("{} within {LIMIT:?}; log:\n{}", what(), self.log.join("\n"))
        };
        self.log.push(line.clone());
        line
    }

    /// Every log line so far.
    pub fn drain_log(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// How many log lines so far contain `needle`.
    pub fn count(&mut self, needle: &str) -> usize {
        self.drain_log()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(self.pid, signal) }, 0);
    }

    /// Waits (bounded) for the master to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("not yet waited for");
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                self.exited_at = Some(Instant::now());
                // What it logged last, for a second at most (processes it left behind,
                // such as an upgrade's new master, may log on into the same pipe).
                let until = Instant::now() + Duration::from_secs(1);
                while let Ok(line) = self
                    .lines
                    .recv_timeout(until.saturating_duration_since(Instant::now()))
                {
                    self.log.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the master did not exit; log:\n{}",
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Whatever the test did, leave nothing of this server running.
        // SAFETY: kill has no memory-safety preconditions; the group is the server's.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// Sends raw bytes on a new connection and reads until the server closes it.
pub fn exchange(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET path` with `Connection: close`: (status, body).
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let reply = exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    parse(&reply)
}

/// (status, body) of one complete response.
pub fn parse(reply: &str) -> (u16, String) {
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Whether process `pid` is running (exists and is not a zombie).
pub fn running(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The pids of `pid`'s children (running or zombie).
pub fn children(pid: libc::pid_t) -> Vec<libc::pid_t> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Waits (bounded) until `cond` holds, polling every few milliseconds.
pub fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `FORKLOOP_HARDENING_FULL=1` runs the full sizes; CI runs reduced, still meaningful ones.
pub fn size<T>(reduced: T, full: T) -> T {
    if std::env::var_os("FORKLOOP_HARDENING_FULL").is_some() {
        full
    } else {
        reduced
    }
}

/// The fds process `pid` has open.
pub fn open_fds(pid: libc::pid_t) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(Vec::new(), |dir| {
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    })
}

/// How many fds process `pid` has open.
pub fn fd_count(pid: libc::pid_t) -> usize {
    open_fds(pid).len()
}

/// Process `pid`'s resident set size, in KiB.
pub fn rss_kib(pid: libc::pid_t) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The CPU time (user + system) process `pid` has used.
pub fn cpu_time(pid: libc::pid_t) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command: state is the 3rd field of stat, utime the 14th.
    let fields: Vec<u64> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| {
            rest.split(' ')
                .skip(11)
                .take(2)
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(fields.iter().sum::<u64>() * 1000 / ticks)
}

/// Every live process (zombies included) in process group `pgid`.
pub fn group_members(pgid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|&pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command: state, ppid, pgrp.
            stat.rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').nth(2)?.parse::<libc::pid_t>().ok())
                == Some(pgid)
        })
        .collect()
}

/// A keep-alive connection that sends `GET path` and reads one response at a time.
pub struct KeepAlive {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    pub fn connect(addr: &str) -> KeepAlive {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        KeepAlive { stream, reader }
    }

    /// Sends `count` pipelined `GET path` requests in one write.
    pub fn send(&mut self, path: &str, count: usize) {
        let one = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        self.stream.write_all(one.repeat(count).as_bytes()).unwrap();
    }

    /// Reads until the server closes the connection (or it fails); returns what came.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let _ = self.reader.read_to_end(&mut rest);
        rest
    }

    /// Reads one response: (status, body).
    pub fn response(&mut self) -> (u16, String) {
        let mut head = String::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .expect("reading a response");
            assert!(
                n > 0,
                "the server closed the connection; head so far: {head:?}"
            );
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                length = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        (parse(&head).0, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Waits for a server started without waiting (see [`spawn_command`]) to log its ready
/// line, and takes its first listener's address from it, as [`start`] does.
pub fn wait_ready(server: Server) -> Server {
    ready(server)
}

/// `GET path` with `Connection: close` over the Unix socket at `socket`: (status, body).
pub fn get_unix(socket: &std::path::Path, path: &str) -> (u16, String) {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    parse(&String::from_utf8_lossy(&out))
}

/// A directory of the test's own, removed when it ends.
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("forkloop-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The inodes of the sockets listening on TCP `port` (`/proc/net/tcp` and `tcp6`): one
/// per lane under `--reuse-port`, one in all without.
pub fn listening_sockets(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(&"0A"), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let listening_port = local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if listening_port == Some(port) {
                inodes.extend(inode.parse::<u64>().ok());
            }
        }
    }
    inodes.sort_unstable();
    inodes
}

/// The inodes of the sockets among process `pid`'s fds.
pub fn socket_inodes(pid: libc::pid_t) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut inodes: Vec<u64> = dir
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.ok()?.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    inodes.sort_unstable();
    inodes
}

/// The port of a `host:port` address.
pub fn port_of(addr: &str) -> u16 {
    let (_, port) = addr.rsplit_once(':').expect("host:port");
    port.parse().expect("a port")
}

/// The lanes of `master`'s server on `addr`, if they are as `--reuse-port` promises:
/// every socket listening on its port is held by the master and by exactly one running
/// worker, and each worker holds one of them. Draining workers, which have closed
/// theirs, hold none.
pub fn lanes(master: libc::pid_t, addr: &str) -> Result<usize, String> {
    let lanes = listening_sockets(port_of(addr));
    let held_by_master = socket_inodes(master);
    if let Some(lane) = lanes.iter().find(|lane| !held_by_master.contains(lane)) {
        return Err(format!("the master does not hold lane socket {lane}"));
    }
    let mut holders: std::collections::HashMap<u64, Vec<libc::pid_t>> = Default::default();
    for worker in children(master).into_iter().filter(|&pid| running(pid)) {
        let held: Vec<u64> = (socket_inodes(worker).into_iter())
            .filter(|socket| lanes.contains(socket))
            .collect();
        match held[..] {
            [] => {} // draining
            [lane] => holders.entry(lane).or_default().push(worker),
            _ => return Err(format!("worker {worker} holds lanes {held:?}")),
        }
    }
    for lane in &lanes {
        match holders.get(lane).map(Vec::as_slice) {
            Some([_]) => {}
            None => return Err(format!("no worker serves lane socket {lane}")),
            Some(more) => return Err(format!("workers {more:?} share lane socket {lane}")),
        }
    }
    Ok(lanes.len())
}

/// Waits (bounded) until `master` has `count` lanes, each as [`lanes`] checks.
pub fn wait_lanes(master: libc::pid_t, addr: &str, count: usize) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let now = lanes(master, addr);
        if now == Ok(count) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{count} lanes, each with its worker: not within {LIMIT:?}; last: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
