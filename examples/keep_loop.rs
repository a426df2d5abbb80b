//! A child that keeps the loop it inherited, libev/libuv style, after a plain `fork()`.
//!
//! The loop notices the fork before it next touches its backend and runs `post_fork`
//! by itself: on epoll a new instance, so the child's changes never reach the parent.
//! IO watches and timers survive; the parent's child watches do not.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use forkloop::{Interest, Loop};

fn main() -> forkloop::Result<()> {
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut lp: Loop = Loop::new()?;
    // The loop owns `theirs` and lends it to the callback.
    let read_watch = lp.watch_io(theirs, Interest::READ, |_, (), mut theirs, _| {
        let mut buf = [0u8; 64];
        let n = theirs.read(&mut buf).unwrap_or(0);
        println!(
            "pid {}: read {:?}",
            std::process::id(),
            String::from_utf8_lossy(&buf[..n])
        );
    })?;
    let timer = lp.after(Duration::from_millis(100), |lp, ()| {
        println!(
            "pid {}: the timer armed before the fork fired",
            std::process::id()
        );
        lp.stop(0);
    });

    // SAFETY: the child only uses the loop and then _exits; it never returns into main.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // Same loop, same watches, rebuilt for this process on first use.
        let code = match lp.run(&mut ()) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("child: {e}");
                1
            }
        };
        let _ = std::io::stdout().flush();
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    // The parent leaves the socket and the timer to the child: cancelling the watch
    // closes the parent's copy of the socket. On epoll it first deregisters the socket
    // from the instance both processes still share — harmless, because the child's loop
    // rebuilds from its own tables into an instance of its own.
    lp.cancel(read_watch);
    lp.cancel(timer);
    ours.write_all(b"hello, child").expect("write");
    lp.watch_process(pid, |lp, (), pid, status| {
        match status {
            Ok(status) => println!("parent: child {pid} exited: {status}"),
            Err(e) => println!("parent: child {pid}: {e}"),
        }
        lp.stop(0);
    })?;
    lp.run(&mut ())?;
    Ok(())
}
