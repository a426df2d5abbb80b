//! A master that forks workers, each on a fresh loop, and supervises them from its own.
//!
//! `cargo run --example prefork -- 3` forks three workers; each ticks a few times on its
//! own process-global loop and exits. The master reports every exit, and stops early on
//! Ctrl-C (the workers get SIGTERM).

use std::time::Duration;

use forkloop::{ForkOptions, Loop};

fn worker(number: u32) -> i32 {
    // The child's process-global loop is a fresh one: the master's never leaks in.
    let result = Loop::with_global(|lp| {
        println!("worker {number}: pid {} on {}", std::process::id(), lp.id());
        let mut ticks = 0;
        lp.every(Duration::from_millis(100), move |lp, ()| {
            ticks += 1;
            if ticks == 3 {
                lp.stop(0);
            }
        })?;
        lp.run(&mut ())
    });
    match result {
        Ok(Ok(code)) => code,
        Ok(Err(e)) | Err(e) => {
            eprintln!("worker {number}: {e}");
            1
        }
    }
}

fn main() -> forkloop::Result<()> {
    let workers: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    // The master's state, lent to its callbacks: how many workers still run.
    let mut master: Loop<u32> = Loop::new()?;
    println!(
        "master: pid {} on the {} backend",
        std::process::id(),
        master.backend_name()
    );
    let mut pids = Vec::new();
    for number in 1..=workers {
        let pid = master.fork(ForkOptions::new(), move || worker(number))?;
        pids.push(pid);
        master.watch_process(pid, move |lp, running, pid, status| {
            match status {
                Ok(status) => println!("master: worker {number} (pid {pid}) exited: {status}"),
                Err(e) => println!("master: worker {number}: {e}"),
            }
            *running -= 1;
            if *running == 0 {
                lp.stop(0);
            }
        })?;
    }
    let watched = pids.clone();
    master.watch_signal(libc::SIGINT, move |_, _, _| {
        for &pid in &watched {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    })?;
    let mut running = workers;
    master.run(&mut running)?;
    println!("master: all workers exited");
    Ok(())
}
