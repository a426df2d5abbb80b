//! Streamed request bodies: `PUT /upload` reads the body as it arrives, of any length
//! up to `--max-upload` (far past the server's `max_body_size`), and answers with its
//! length and FNV-1a hash; the worker holds at most about 128 KiB of it at a time, as
//! the connection reads from the client only while the handler keeps up. Every other
//! request is buffered as usual (`POST /echo` echoes, within `max_body_size`).
//!
//! ```text
//! cargo run --example upload --features server,epoll -- --listen 127.0.0.1:8080
//! head -c 1G /dev/zero | curl -T - 127.0.0.1:8080/upload
//! ```

use clap::Parser;
use forkloop::server::http::{request::Parts, Method, StatusCode};
use forkloop::server::{
    text, BodyMode, BodyReceiver, Config, Handler, Received, Request, Responder, Server,
    StreamedRequest, Worker,
};
use forkloop::Loop;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The longest upload taken, in bytes (past it: 413).
    #[arg(long, default_value_t = 1 << 40)]
    max_upload: u64,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let mut config = Config::default();
    config.supervisor.listen = vec![args.listen];
    config.supervisor.workers = args.workers;
    let app = Uploads {
        max: args.max_upload,
    };
    if let Err(e) = Server::new(config, app).run() {
        log::error!("{e}");
        std::process::exit(1);
    }
}

struct Uploads {
    max: u64,
}

impl Handler for Uploads {
    fn body_mode(&self, head: &Parts) -> BodyMode {
        match (&head.method, head.uri.path()) {
            (&Method::PUT, "/upload") => BodyMode::Streamed,
            _ => BodyMode::Buffered,
        }
    }

    fn call(&self, lp: &mut Loop<Worker>, request: Request, responder: Responder) {
        let answer = match (request.method(), request.uri().path()) {
            (&Method::POST, "/echo") => forkloop::server::Response::new(request.into_body()),
            (_, "/pid") => text(StatusCode::OK, format!("{}\n", std::process::id())),
            _ => text(StatusCode::NOT_FOUND, "PUT /upload, POST /echo, GET /pid\n"),
        };
        responder.send(lp, answer);
    }

    fn call_streamed(&self, lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        let upload = Upload {
            body: request.into_body(),
            responder,
            hash: Fnv1a::default(),
            max: self.max,
        };
        upload.read_on(lp);
    }
}

/// An upload being read.
struct Upload {
    body: BodyReceiver,
    responder: Responder,
    hash: Fnv1a,
    max: u64,
}

impl Upload {
    /// Takes what has arrived; waits for more; answers at the end, or when it stops.
    fn read_on(mut self, lp: &mut Loop<Worker>) {
        loop {
            match self.body.read(lp) {
                Ok(Received::Data(data)) if self.body.received() > self.max => {
                    drop(data);
                    // The rest is read and dropped: the connection stays usable.
                    let why = format!("an upload is at most {} bytes\n", self.max);
                    return self
                        .responder
                        .send(lp, text(StatusCode::PAYLOAD_TOO_LARGE, why));
                }
                Ok(Received::Data(data)) => self.hash.write(&data),
                Ok(Received::Wait) => {
                    let Upload {
                        body,
                        responder,
                        hash,
                        max,
                    } = self;
                    return body.when_readable(lp, move |lp, _, body| {
                        let upload = Upload {
                            body,
                            responder,
                            hash,
                            max,
                        };
                        upload.read_on(lp);
                    });
                }
                Ok(Received::End) => {
                    let answer = format!(
                        "bytes {} fnv1a {:016x}\n",
                        self.body.received(),
                        self.hash.0
                    );
                    return self.responder.send(lp, text(StatusCode::OK, answer));
                }
                Err(why) => {
                    log::info!("an upload stopped: {why}");
                    // Too late if the server answered already (a malformed body: 400; a
                    // stalled one: 408); a client that closed its side mid-body gets it.
                    let answer = text(StatusCode::BAD_REQUEST, format!("{why}\n"));
                    return self.responder.send(lp, answer);
                }
            }
        }
    }
}

/// The 64-bit FNV-1a hash, which the test computes too.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, data: &[u8]) {
        for &byte in data {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
