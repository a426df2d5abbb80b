//! Signal and child-process watching: callbacks run in dispatch, never in a handler.
//!
//! Spawns `sleep 0.2` with `std::process::Command` and watches its pid, sends itself
//! SIGUSR1, and stops when the child is gone. Press Ctrl-C to stop early.

use forkloop::Loop;

fn main() -> forkloop::Result<()> {
    let mut lp: Loop = Loop::new()?;
    lp.watch_signal(libc::SIGUSR1, |_, (), sig| {
        println!("got signal {sig} in dispatch")
    })?;
    lp.watch_signal(libc::SIGINT, |lp, (), _| {
        println!("interrupted");
        lp.stop(130);
    })?;
    let child = std::process::Command::new("sleep")
        .arg("0.2")
        .spawn()
        .expect("spawning sleep");
    lp.watch_process(child.id() as libc::pid_t, |lp, (), pid, status| {
        match status {
            Ok(status) => println!("child {pid} exited: {status}"),
            Err(e) => println!("child {pid}: {e}"), // reaped by other code (ReapedElsewhere)
        }
        lp.stop(0);
    })?;
    // SAFETY: raise has no memory-safety preconditions.
    unsafe { libc::raise(libc::SIGUSR1) };
    let code = lp.run(&mut ())?;
    std::process::exit(code);
}
