//! A load generator that counts what a deploy must not lose: client threads sending
//! `GET` requests one after another, on keep-alive connections or one connection each.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::LIMIT;

/// How a client uses its connections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reuse {
    /// One connection for as long as the server keeps it open.
    KeepAlive,
    /// `Connection: close`: a new connection per request.
    Close,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Requests answered with a complete 200 response.
    pub answered: u64,
    /// Requests on a reused keep-alive connection that the server closed before any
    /// byte of an answer, sent again on a new connection, as RFC 9112 §9.3.1 lets a
    /// client do for an idempotent request (and as browsers, curl and hyper do): the
    /// server had not begun to answer it.
    pub retried: u64,
    /// Connections refused (`accept_refusals`: the server is shutting down). Nothing
    /// was sent on them.
    pub refused: u64,
    /// Everything else: a request sent on a new connection and never answered, a
    /// reset, a truncated or non-200 answer, a refused connection when refusals are
    /// not allowed.
    pub failed: Vec<String>,
}

/// Client threads running until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    clients: Vec<JoinHandle<Report>>,
}

impl Load {
    /// `clients` threads sending `GET path` to `addr`. With `accept_refusals`, a
    /// refused connection counts as `refused`, not as a failure.
    pub fn start(
        addr: &str,
        path: &str,
        clients: usize,
        reuse: Reuse,
        accept_refusals: bool,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let clients = (0..clients)
            .map(|_| {
                let (addr, path) = (addr.to_owned(), path.to_owned());
                let (stop, answered) = (stop.clone(), answered.clone());
                std::thread::spawn(move || {
                    client(&addr, &path, reuse, accept_refusals, &stop, &answered)
                })
            })
            .collect();
        Load {
            stop,
            answered,
            clients,
        }
    }

    /// Waits (bounded) until the clients have had `count` answers in all.
    pub fn wait_answered(&self, count: u64) {
        super::eventually(&format!("{count} answers"), || {
            self.answered.load(Ordering::SeqCst) >= count
        });
    }

    /// The answers the clients have had so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    /// Stops the clients and adds up what they saw.
    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Report::default();
        for client in self.clients {
            let report = client.join().expect("a load client panicked");
            total.answered += report.answered;
            total.retried += report.retried;
            total.refused += report.refused;
            total.failed.extend(report.failed);
        }
        total
    }
}

/// A keep-alive connection and how many answers it has carried.
struct Conn {
    reader: BufReader<TcpStream>,
    answers: u64,
}

fn client(
    addr: &str,
    path: &str,
    reuse: Reuse,
    accept_refusals: bool,
    stop: &AtomicBool,
    answered: &AtomicU64,
) -> Report {
    let mut report = Report::default();
    let mut conn: Option<Conn> = None;
    let close = if reuse == Reuse::Close {
        "Connection: close\r\n"
    } else {
        ""
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: load\r\n{close}\r\n");
    while !stop.load(Ordering::SeqCst) {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match TcpStream::connect(addr) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(LIMIT)).unwrap();
                    Conn {
                        reader: BufReader::new(stream),
                        answers: 0,
                    }
                }
                Err(e) if accept_refusals && e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    report.refused += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    continue;
                }
                Err(e) => {
                    report.failed.push(format!("connect: {e}"));
                    continue;
                }
            },
        };
        let reused = c.answers > 0;
        let sent = c.reader.get_mut().write_all(request.as_bytes());
        match sent
            .map_err(Answer::from)
            .and_then(|()| read_answer(&mut c.reader))
        {
            Ok((200, keep)) => {
                report.answered += 1;
                answered.fetch_add(1, Ordering::SeqCst);
                c.answers += 1;
                if keep && reuse == Reuse::KeepAlive {
                    conn = Some(c);
                }
            }
            Ok((status, _)) => report.failed.push(format!("status {status}")),
            Err(Answer::Nothing) if reused => report.retried += 1,
            Err(Answer::Nothing) => report.failed.push("no answer on a new connection".into()),
            Err(Answer::Broken(why)) => report.failed.push(why),
        }
    }
    report
}

/// Why no complete answer came.
enum Answer {
    /// The connection ended before any byte of an answer.
    Nothing,
    /// It ended (or failed) within one.
    Broken(String),
}

impl From<std::io::Error> for Answer {
    fn from(e: std::io::Error) -> Answer {
        match e.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => Answer::Nothing,
            _ => Answer::Broken(e.to_string()),
        }
    }
}

/// Reads one response: its status, and whether the connection stays open.
fn read_answer(reader: &mut BufReader<TcpStream>) -> Result<(u16, bool), Answer> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| match head.is_empty() {
                true => Answer::from(e),
                false => Answer::Broken(format!("reading the head: {e}")),
            })?;
        match (n, head.is_empty()) {
            (0, true) => return Err(Answer::Nothing),
            (0, false) => return Err(Answer::Broken(format!("the head ended: {head:?}"))),
            _ if line == "\r\n" => break,
            _ => head.push(line),
        }
    }
    let status = head[0]
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Answer::Broken(format!("not a status line: {:?}", head[0])))?;
    let header = |name: &str| {
        head.iter().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Answer::Broken(format!("no Content-Length in {head:?}")))?;
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| Answer::Broken(format!("the body ended: {e}")))?;
    Ok((status, header("connection").as_deref() != Some("close")))
}
