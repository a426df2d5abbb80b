//! Operating `forkloop serve`: `forkloop status` (a table, or JSON) from the master's
//! control socket, and `--max-worker-memory` recycling, as real processes.

mod common;

use std::process::Command;

use common::load::{Load, Reuse};
use common::*;

/// `forkloop status` with `args`: its stdout, checked to succeed.
fn status(args: &[&str]) -> String {
    let out = Command::new(binary())
        .arg("status")
        .args(args)
        .output()
        .expect("running forkloop status");
    assert!(
        out.status.success(),
        "forkloop status {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_lists_each_worker_as_a_table_and_as_json() {
    let scratch = Scratch::new("status");
    let pid_file = scratch.path("serve.pid");
    let pid_file = pid_file.to_str().unwrap();
    // Heartbeats (and so request counts) every 250 ms.
    let server = start(&[
        "--workers",
        "2",
        "--pid-file",
        pid_file,
        "--heartbeat-timeout",
        "1",
    ]);
    for _ in 0..10 {
        assert_eq!(get(&server.addr, "/").0, 200);
    }
    let workers = children(server.pid);
    let served = |json: &serde_json::Value| -> u64 {
        let workers = json["workers"].as_array().unwrap();
        workers.iter().filter_map(|w| w["requests"].as_u64()).sum()
    };
    eventually("every request counted", || {
        let json: serde_json::Value =
            serde_json::from_str(&status(&["--pid-file", pid_file, "--json"])).unwrap();
        served(&json) == 10
    });
    let json: serde_json::Value =
        serde_json::from_str(&status(&["--pid-file", pid_file, "--json"])).unwrap();
    assert_eq!(json["master"], server.pid);
    let listed = json["workers"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{json:#}");
    for w in listed {
        let pid = w["pid"].as_i64().unwrap() as libc::pid_t;
        assert!(workers.contains(&pid), "{pid} is not a worker: {workers:?}");
        assert_eq!(w["state"], "ready");
        assert!(w["slot"].as_u64().unwrap() >= 1);
        assert!(w["age_seconds"].as_f64().unwrap() > 0.0);
        assert!(w["rss_bytes"].as_u64().unwrap() > 1 << 20, "{w}");
        assert!(w["last_heard_seconds_ago"].as_f64().unwrap() < 1.0, "{w}");
    }
    let table = status(&["--pid-file", pid_file]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], format!("master {}", server.pid));
    assert!(lines[1].starts_with("PID"), "{table}");
    assert_eq!(lines.len(), 4, "{table}");
    for pid in &workers {
        assert!(
            lines.iter().any(|l| l.starts_with(&pid.to_string())),
            "{table}"
        );
    }
}

#[test]
fn status_without_a_master_is_a_clear_error() {
    let scratch = Scratch::new("status-none");
    let pid_file = scratch.path("none.pid");
    let out = Command::new(binary())
        .args(["status", "--pid-file", pid_file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("none.pid.ctl"), "{stderr}");
    assert!(
        stderr.contains("no master runs with this control socket"),
        "{stderr}"
    );
}

#[test]
fn a_worker_above_max_worker_memory_is_recycled_with_no_failed_request() {
    let server = start(&[
        "--workers",
        "1",
        "--app",
        "leaky",
        "--max-worker-memory",
        "67108864",
        "--heartbeat-timeout",
        "1",
    ]);
    let (_, first) = get(&server.addr, "/pid");
    let load = Load::start(&server.addr, "/", 2, Reuse::KeepAlive, false);
    load.wait_answered(50);
    assert_eq!(get(&server.addr, "/grow?mb=100").0, 200);
    let mut server = server;
    server.wait_for("MiB, above max_worker_memory; replacing it");
    eventually("another worker answering", || {
        get(&server.addr, "/pid").1 != first
    });
    let answered = load.answered();
    load.wait_answered(answered + 50);
    let report = load.finish();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
}
