//! libev 4 (Debian's libev-dev) behind a small C shim (src/shim.c), for forkloop's
//! benches: each method does in C what the matching forkloop bench does through the
//! loop, so "≤ libev" is measured in the same run. Every loop uses libev's epoll backend.
//!
//! Without libev's header at build time (or off Linux, or with `FORKLOOP_NO_LIBEV` set)
//! the crate builds with no shim: [`Libev::new`] then says why, and the benches skip
//! their libev rows with that message.

use std::os::fd::RawFd;

#[cfg(has_libev)]
mod ffi {
    use std::os::raw::c_int;

    #[repr(C)]
    pub struct FlEv {
        _opaque: [u8; 0],
    }

    extern "C" {
        pub fn fl_ev_new() -> *mut FlEv;
        pub fn fl_ev_free(b: *mut FlEv);
        pub fn fl_ev_watch_reads(
            b: *mut FlEv,
            readers: *const c_int,
            writers: *const c_int,
            n: usize,
            timeouts: c_int,
        ) -> c_int;
        pub fn fl_ev_run_nowait(b: *mut FlEv);
        pub fn fl_ev_round(b: *mut FlEv, active: usize);
        pub fn fl_ev_restart_all(b: *mut FlEv);
        pub fn fl_ev_toggle_all(b: *mut FlEv, both: c_int);
        pub fn fl_ev_timers_arm(b: *mut FlEv, delays: *const f64, n: usize) -> c_int;
        pub fn fl_ev_timers_fire(b: *mut FlEv) -> usize;
        pub fn fl_ev_signal_start(b: *mut FlEv, signo: c_int);
        pub fn fl_ev_signal_stop(b: *mut FlEv);
        pub fn fl_ev_signal_once(b: *mut FlEv);
        pub fn fl_ev_post_fork_run(b: *mut FlEv);
        pub fn fl_ev_fork_round_trip(b: *mut FlEv) -> c_int;
    }
}

/// Why there is no libev here, when there is none.
pub const MISSING: &str = if cfg!(has_libev) {
    ""
} else {
    "libev was not found when forkloop-bench-libev was built (Debian: apt-get install \
     libev-dev, then rebuild), or FORKLOOP_NO_LIBEV was set"
};

/// One libev loop (`ev_loop_new(EVBACKEND_EPOLL)`) and the watchers of one bench.
#[cfg_attr(not(has_libev), allow(dead_code))]
pub struct Libev {
    #[cfg(has_libev)]
    raw: *mut ffi::FlEv,
    /// The fds the C side points into: held here so that they outlive the loop.
    fds: Vec<RawFd>,
    signal: bool,
}

#[cfg(has_libev)]
impl Libev {
    /// A loop on libev's epoll backend, or why not.
    pub fn new() -> Result<Libev, String> {
        // SAFETY: no arguments; returns NULL on failure, checked.
        let raw = unsafe { ffi::fl_ev_new() };
        if raw.is_null() {
            return Err("ev_loop_new(EVBACKEND_EPOLL) failed".into());
        }
        Ok(Libev {
            raw,
            fds: Vec::new(),
            signal: false,
        })
    }

    /// A read watch per reader (`writers[i]` makes `readers[i]` readable), each with a
    /// 600 s idle timer pushed back by every read (`ev_timer_again`) if `timeouts`.
    /// Nothing reaches the kernel until the loop runs ([`Libev::run_nowait`]). Once only.
    pub fn watch_reads(&mut self, readers: &[RawFd], writers: &[RawFd], timeouts: bool) {
        assert!(self.fds.is_empty(), "watch_reads once per loop");
        assert_eq!(readers.len(), writers.len());
        self.fds = readers.iter().chain(writers).copied().collect();
        let n = readers.len();
        // SAFETY: both arrays live in self.fds, which is never changed again and is
        // dropped only after the loop (Drop frees the loop first).
        let rc = unsafe {
            let p = self.fds.as_ptr();
            ffi::fl_ev_watch_reads(self.raw, p, p.add(n), n, timeouts.into())
        };
        assert_eq!(rc, 0, "out of memory");
    }

    /// `ev_run(EVRUN_NOWAIT)`: applies pending watcher changes to the kernel.
    pub fn run_nowait(&mut self) {
        // SAFETY: a live loop.
        unsafe { ffi::fl_ev_run_nowait(self.raw) }
    }

    /// One libevent bench.c round with `active` active fds (see benches/backends.rs).
    pub fn round(&mut self, active: usize) {
        assert!(active >= 1 && active <= self.fds.len() / 2);
        // SAFETY: a live loop with its watches (asserted above).
        unsafe { ffi::fl_ev_round(self.raw, active) }
    }

    /// `ev_io_stop` + `ev_io_start` on every read watch, then `ev_run(EVRUN_NOWAIT)`.
    pub fn restart_all(&mut self) {
        // SAFETY: a live loop.
        unsafe { ffi::fl_ev_restart_all(self.raw) }
    }

    /// Every read watch to READ|WRITE (`both`) or READ, then `ev_run(EVRUN_NOWAIT)`.
    pub fn toggle_all(&mut self, both: bool) {
        // SAFETY: a live loop.
        unsafe { ffi::fl_ev_toggle_all(self.raw, both.into()) }
    }

    /// What a forked child does first: `ev_loop_fork`, then `ev_run(EVRUN_NOWAIT)`,
    /// which makes a new epoll fd and adds every watched fd again. Run here, in the
    /// parent, it costs what it costs a child.
    pub fn post_fork_run(&mut self) {
        // SAFETY: a live loop.
        unsafe { ffi::fl_ev_post_fork_run(self.raw) }
    }

    /// `fork`: the child does [`Libev::post_fork_run`] and `_exit`s, the parent waits
    /// for it (`waitpid`). Whether the child did.
    pub fn fork_round_trip(&mut self) -> bool {
        // SAFETY: a live loop; the child only runs libev on it and `_exit`s.
        unsafe { ffi::fl_ev_fork_round_trip(self.raw) == 0 }
    }

    /// Arms one one-shot timer per delay (seconds), relative to one clock read; the
    /// timers of an earlier arming that have not fired are stopped first.
    pub fn timers_arm(&mut self, delays: &[f64]) {
        // SAFETY: the slice is read during the call only.
        let rc = unsafe { ffi::fl_ev_timers_arm(self.raw, delays.as_ptr(), delays.len()) };
        assert_eq!(rc, 0, "out of memory");
    }

    /// Runs the loop until every armed timer fired; how many did.
    pub fn timers_fire(&mut self) -> usize {
        // SAFETY: a live loop.
        unsafe { ffi::fl_ev_timers_fire(self.raw) }
    }

    /// Watches `signo` (libev's default signal handling: its handler and its
    /// eventfd or pipe). One signal per loop; no other loop may watch it meanwhile.
    pub fn signal_start(&mut self, signo: i32) {
        assert!(!self.signal, "one signal per loop");
        // SAFETY: a live loop; the watcher lives in the C state until Drop.
        unsafe { ffi::fl_ev_signal_start(self.raw, signo) };
        self.signal = true;
    }

    /// Raises the watched signal and runs the loop until its callback ran.
    pub fn signal_once(&mut self) {
        assert!(self.signal, "signal_start first");
        // SAFETY: a live loop with a started signal watcher (asserted).
        unsafe { ffi::fl_ev_signal_once(self.raw) }
    }
}

#[cfg(has_libev)]
impl Drop for Libev {
    fn drop(&mut self) {
        if self.signal {
            // SAFETY: the watcher started in signal_start; restores the disposition.
            unsafe { ffi::fl_ev_signal_stop(self.raw) };
        }
        // SAFETY: the loop from fl_ev_new, freed once; self.fds outlives this call.
        unsafe { ffi::fl_ev_free(self.raw) };
    }
}

#[cfg(not(has_libev))]
impl Libev {
    /// Always [`MISSING`]: this build has no libev.
    pub fn new() -> Result<Libev, String> {
        Err(MISSING.into())
    }
    /// Unreachable without libev ([`Libev::new`] fails).
    pub fn watch_reads(&mut self, _: &[RawFd], _: &[RawFd], _: bool) {
        unreachable!("{MISSING}")
    }
    /// Unreachable without libev.
    pub fn run_nowait(&mut self) {}
    /// Unreachable without libev.
    pub fn round(&mut self, _: usize) {}
    /// Unreachable without libev.
    pub fn restart_all(&mut self) {}
    /// Unreachable without libev.
    pub fn toggle_all(&mut self, _: bool) {}
    /// Unreachable without libev.
    pub fn timers_arm(&mut self, _: &[f64]) {}
    /// Unreachable without libev.
    pub fn timers_fire(&mut self) -> usize {
        0
    }
    /// Unreachable without libev.
    pub fn signal_start(&mut self, _: i32) {}
    /// Unreachable without libev.
    pub fn signal_once(&mut self) {}
    /// Unreachable without libev.
    pub fn post_fork_run(&mut self) {}
    /// Unreachable without libev.
    pub fn fork_round_trip(&mut self) -> bool {
        false
    }
}

#[cfg(all(test, has_libev))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_round_reads_what_it_wrote_and_timers_all_fire() {
        let pairs: Vec<_> = (0..4).map(|_| UnixStream::pair().unwrap()).collect();
        let readers: Vec<RawFd> = pairs.iter().map(|(a, _)| a.as_raw_fd()).collect();
        let writers: Vec<RawFd> = pairs.iter().map(|(_, b)| b.as_raw_fd()).collect();
        for (a, _) in &pairs {
            a.set_nonblocking(true).unwrap();
        }
        let mut ev = Libev::new().unwrap();
        ev.watch_reads(&readers, &writers, true);
        ev.run_nowait();
        ev.round(2); // returns only once 4 bytes were read
        ev.restart_all();
        ev.toggle_all(true);
        ev.toggle_all(false);
        ev.timers_arm(&[0.0, 0.001, 0.0005]);
        assert_eq!(ev.timers_fire(), 3);
        assert!(ev.fork_round_trip(), "the child re-added its fds and ran");
        ev.post_fork_run();
        ev.round(2); // the parent's loop works after both
    }

    /// Re-arming while timers of the last arming are pending (freed and re-initialised
    /// under libev's heap before the shim stopped them: a SIGSEGV) arms only the new.
    #[test]
    fn timers_re_armed_before_they_fire_replace_the_pending_ones() {
        let mut ev = Libev::new().unwrap();
        ev.timers_arm(&[600.0; 3]);
        ev.timers_arm(&[600.0; 5]); // another size: the array is freed
        ev.timers_arm(&[0.0, 0.0005, 0.001, 0.0, 0.0]); // the same size: re-initialised
        assert_eq!(ev.timers_fire(), 5);
    }
}
