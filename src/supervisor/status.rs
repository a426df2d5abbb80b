//! The status view: each worker's pid, slot, state, age, requests served, memory and
//! last heartbeat, as the master knows them, through its control socket
//! ([`Config::control_socket`](super::Config::control_socket); `forkloop status`).
//!
//! The protocol: connect, and read until EOF (the master writes the view and closes;
//! it reads nothing). The first line is `forkloop-status 1 <master pid>`, then one line
//! per worker of seven tab-separated fields: pid, slot, state (`starting`, `ready`,
//! `draining`), age in milliseconds, requests served (`-` if the worker never said),
//! resident memory in bytes (`-` where the OS does not say), and milliseconds since the
//! master last heard from it.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// What a worker is doing, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Forked, not ready yet.
    Starting,
    /// Serving.
    Ready,
    /// Told to drain (TERM), and not gone yet.
    Draining,
}

impl WorkerState {
    /// `starting`, `ready` or `draining`.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
        }
    }

    fn from_name(name: &str) -> Option<WorkerState> {
        [
            WorkerState::Starting,
            WorkerState::Ready,
            WorkerState::Draining,
        ]
        .into_iter()
        .find(|state| state.name() == name)
    }
}

/// One worker in the status view.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// Its pid.
    pub pid: libc::pid_t,
    /// Its slot: a number never reused in the master's life.
    pub slot: usize,
    /// What it is doing.
    pub state: WorkerState,
    /// Since it was forked.
    pub age: Duration,
    /// The requests it served in all, as it last said
    /// ([`MasterLink::report_served`](super::MasterLink::report_served)); forkloop's
    /// HTTP workers say with each heartbeat.
    pub served: Option<u64>,
    /// Its resident set size, in bytes (Linux; `None` elsewhere).
    pub rss: Option<u64>,
    /// Since the master last heard from it (a heartbeat, or any message).
    pub last_heard: Duration,
}

/// The master's view of its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The master's pid.
    pub master: libc::pid_t,
    /// Its workers, by slot.
    pub workers: Vec<WorkerStatus>,
}

const MAGIC: &str = "forkloop-status 1";

impl Status {
    /// Asks the master listening on `control_socket` (waits 5 s at most).
    pub fn query(control_socket: &Path) -> io::Result<Status> {
        let mut socket = UnixStream::connect(control_socket).map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::NotFound => {
                    "no master runs with this control socket (Config::control_socket, \
                     by default beside the pid file)"
                }
                _ => "is the master running?",
            };
            io::Error::new(
                e.kind(),
                format!("{}: {e}: {hint}", control_socket.display()),
            )
        })?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut text = String::new();
        socket.read_to_string(&mut text)?;
        Status::decode(&text)
    }

    /// The control socket a master with pid file `pid_file` has by default:
    /// `PID_FILE.ctl`.
    pub fn beside(pid_file: &Path) -> std::path::PathBuf {
        super::master::control_socket_beside(pid_file)
    }

    /// The view as the master writes it on its control socket.
    pub(crate) fn encode(&self) -> String {
        let mut text = format!("{MAGIC} {}\n", self.master);
        let or_dash = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
        for w in &self.workers {
            text += &format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                w.pid,
                w.slot,
                w.state.name(),
                w.age.as_millis(),
                or_dash(w.served),
                or_dash(w.rss),
                w.last_heard.as_millis()
            );
        }
        text
    }

    fn decode(text: &str) -> io::Result<Status> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a forkloop status: {what}"),
            )
        };
        let mut lines = text.lines();
        let first = lines.next().ok_or_else(|| bad("nothing came"))?;
        let master = first
            .strip_prefix(MAGIC)
            .and_then(|rest| rest.trim().parse().ok())
            .ok_or_else(|| bad(first))?;
        let workers = lines
            .map(|line| worker(line).ok_or_else(|| bad(line)))
            .collect::<io::Result<_>>()?;
        Ok(Status { master, workers })
    }
}

fn worker(line: &str) -> Option<WorkerStatus> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [pid, slot, state, age, served, rss, heard] = fields[..] else {
        return None;
    };
    let optional = |field: &str| match field {
        "-" => Some(None),
        n => n.parse().ok().map(Some),
    };
    let millis = |field: &str| field.parse().ok().map(Duration::from_millis);
    Some(WorkerStatus {
        pid: pid.parse().ok()?,
        slot: slot.parse().ok()?,
        state: WorkerState::from_name(state)?,
        age: millis(age)?,
        served: optional(served)?,
        rss: optional(rss)?,
        last_heard: millis(heard)?,
    })
}

/// Process `pid`'s resident set size in bytes, where the OS says (Linux's `/proc`).
pub(crate) fn rss_bytes(pid: libc::pid_t) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    pages.checked_mul(u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_reads_back_as_it_was_written() {
        let status = Status {
            master: 10,
            workers: vec![
                WorkerStatus {
                    pid: 11,
                    slot: 1,
                    state: WorkerState::Ready,
                    age: Duration::from_millis(61_000),
                    served: Some(1234),
                    rss: Some(5 << 20),
                    last_heard: Duration::from_millis(250),
                },
                WorkerStatus {
                    pid: 12,
                    slot: 7,
                    state: WorkerState::Starting,
                    age: Duration::from_millis(3),
                    served: None,
                    rss: None,
                    last_heard: Duration::ZERO,
                },
            ],
        };
        assert_eq!(Status::decode(&status.encode()).unwrap(), status);
    }

    #[test]
    fn what_is_not_a_view_is_an_error_saying_so() {
        for text in [
            "",
            "HTTP/1.1 200 OK\r\n",
            "forkloop-status 1 10\n11\t1\tready\n",
        ] {
            let e = Status::decode(text).unwrap_err();
            assert!(e.to_string().starts_with("not a forkloop status"), "{e}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_has_a_resident_size() {
        let rss = rss_bytes(std::process::id() as libc::pid_t).expect("/proc/self/statm");
        assert!(rss > 1 << 20, "{rss}");
    }
}
