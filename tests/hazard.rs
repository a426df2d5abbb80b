//! The FIXFORK plan's diagnostic step, done with plain syscalls: what goes wrong when a
//! forked child uses the epoll instance it inherited. These tests assert the hazard
//! itself (they pass because the kernel behaves so); `fork.rs` runs the same scenarios
//! through forkloop on every backend and asserts that none of it happens there:
//! `fork_child_cancelling_and_dropping_everything_leaves_the_parent_its_events` and
//! `fork_child_registrations_never_reach_the_parent`.
#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;

fn epoll_add(epfd: i32, fd: i32) {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: ev is a live epoll_event.
    assert_eq!(
        unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) },
        0
    );
}

/// The fds epoll reports within `timeout`.
fn epoll_ready(epfd: i32, timeout: Duration) -> Vec<i32> {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
    // SAFETY: events is a live buffer of 8 entries.
    let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), 8, timeout.as_millis() as i32) };
    assert!(n >= 0, "epoll_wait: {}", std::io::Error::last_os_error());
    events[..n as usize].iter().map(|e| e.u64 as i32).collect()
}

fn epoll() -> i32 {
    // SAFETY: no preconditions; the fd is closed when the isolated process exits.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epfd >= 0);
    epfd
}

#[test]
fn raw_epoll_child_ctl_del_deregisters_the_parents_fd() {
    isolated(|| {
        let (s1, mut s2) = socketpair();
        let epfd = epoll();
        epoll_add(epfd, s1.as_raw_fd());
        let child = raw_fork(|| {
            // SAFETY: a DEL needs no event; this is the child's "cleanup".
            unsafe {
                libc::epoll_ctl(
                    epfd,
                    libc::EPOLL_CTL_DEL,
                    s1.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            }
        });
        assert_eq!(exit_code(wait_child(child, Duration::from_secs(10))), 0);
        s2.write_all(b"x").unwrap();
        assert_eq!(
            epoll_ready(epfd, U),
            Vec::<i32>::new(),
            "the child's EPOLL_CTL_DEL removed the parent's registration"
        );
    });
}

#[test]
fn raw_epoll_child_registration_reaches_the_parent() {
    isolated(|| {
        let epfd = epoll();
        let (mut report_r, mut report_w) = std::io::pipe().unwrap();
        let (mut done_r, mut done_w) = std::io::pipe().unwrap();
        let child = raw_fork(|| {
            let (c1, mut c2) = socketpair();
            epoll_add(epfd, c1.as_raw_fd());
            c2.write_all(b"child's data").unwrap();
            report_w.write_all(&c1.as_raw_fd().to_ne_bytes()).unwrap();
            let _ = done_r.read(&mut [0u8; 1]);
            0
        });
        drop((report_w, done_r));
        let mut number = [0u8; 4];
        report_r.read_exact(&mut number).unwrap();
        let ready = epoll_ready(epfd, U);
        done_w.write_all(b"!").unwrap();
        assert_eq!(exit_code(wait_child(child, Duration::from_secs(10))), 0);
        assert_eq!(
            ready,
            vec![i32::from_ne_bytes(number)],
            "the parent's epoll_wait reports an fd only the child registered"
        );
    });
}

/// smol-rs/polling#37: a `Poller` dropped in a child deletes its notifier from the epoll
/// instance it shares with the parent. The parent's next `wait` re-arms the notifier
/// with `EPOLL_CTL_MOD` and fails with ENOENT: its poller is broken for good.
/// forkloop's polling backend forgets the inherited `Poller` instead.
#[test]
fn raw_polling_poller_dropped_in_a_child_breaks_the_parents_notify() {
    isolated(|| {
        let mut slot = Some(polling::Poller::new().unwrap());
        let poller = slot.as_ref().unwrap();
        let mut events = polling::Events::new();
        poller.notify().unwrap();
        poller.wait(&mut events, Some(U)).unwrap();
        let child = raw_fork(|| {
            drop(slot.take());
            0
        });
        assert_eq!(exit_code(wait_child(child, Duration::from_secs(10))), 0);
        let poller = slot.as_ref().unwrap();
        poller.notify().unwrap();
        let err = poller.wait(&mut events, Some(U)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    });
}
