//! `reuse_port`: which lane each worker serves, and as many lanes as workers.
//!
//! A laned listener (see `Bound`) has one `SO_REUSEPORT` socket per lane, and the kernel
//! queues each new connection on one of them by a hash of its addresses, whether or
//! not a worker takes from it. So every lane needs a worker, and a lane's queue must
//! be taken in before the lane closes; the master keeps that true:
//!
//! - A new worker serves the lane of the worker it replaces (HUP, recycling), or the
//!   lowest lane no worker serves (a crash, a first start), or a new lane (`TTIN`).
//!   Every laned listener has the same lanes, added and closed together.
//! - A lane closes when there are more lanes than workers to be (`TTOU`; a `TTIN`
//!   after a `WINCH`), never while a `WINCH` keeps the workers away: its worker drains
//!   it, and if none serves it, a worker is forked to take in its queue and go.

use std::collections::HashMap;

use super::{retire, spawn_on, Bound, Master, Slot, State, SupervisorError, WorkerInfo};
use crate::Loop;

/// The lanes each laned listener has: 1 for a master that just bound them, the old
/// master's count for one an upgrade started; 0 if none is laned.
pub(super) fn count(listeners: &[Bound]) -> usize {
    listeners
        .iter()
        .find(|bound| bound.is_laned())
        .map_or(0, |bound| bound.sockets().len())
}

/// In a master an upgrade started: the sockets it inherited fit its `reuse_port`.
/// Serving some other way would leave lanes unserved, or fail at the next `TTIN`;
/// an error here ends this master, and the old one serves on.
pub(super) fn check_inherited(m: &Master) -> Result<(), SupervisorError> {
    let laned = m.listeners.iter().filter(|bound| bound.is_laned());
    let wrong = |e: String| SupervisorError::Config(format!("upgrade: {e}"));
    if !m.config.reuse_port {
        if m.listeners.iter().any(|bound| bound.sockets().len() > 1) {
            return Err(wrong(
                "the old master runs with reuse_port (--reuse-port) and this one without: \
                 changing it takes a restart"
                    .into(),
            ));
        }
        return Ok(());
    }
    let counts: Vec<usize> = laned.clone().map(|b| b.sockets().len()).collect();
    if counts.windows(2).any(|pair| pair[0] != pair[1]) {
        return Err(wrong(format!(
            "laned listeners with unequal lanes: {counts:?}"
        )));
    }
    for bound in laned {
        let reused = bound.reuses_port().map_err(|e| wrong(e.to_string()))?;
        if !reused {
            return Err(wrong(format!(
                "{}: the old master runs without reuse_port (--reuse-port) and this one \
                 with it: changing it takes a restart",
                bound.listener().address()
            )));
        }
    }
    Ok(())
}

/// Whether a worker serves `lane` (draining ones aside).
fn served(workers: &HashMap<Slot, WorkerInfo>, lane: usize) -> bool {
    (workers.values()).any(|w| w.lane == Some(lane) && w.state != State::Draining)
}

/// The lane of a new worker (see the module's documentation); `None` if nothing is
/// laned. Adding a lane can fail, for want of fds.
pub(super) fn for_new_worker(
    m: &mut Master,
    replaces: Option<Slot>,
) -> Result<Option<usize>, SupervisorError> {
    if m.lanes == 0 {
        return Ok(None);
    }
    let replaced = replaces.and_then(|old| m.workers.get(&old)?.lane);
    if let Some(lane) = replaced.or_else(|| (0..m.lanes).find(|&l| !served(&m.workers, l))) {
        return Ok(Some(lane));
    }
    add(m)?;
    Ok(Some(m.lanes - 1))
}

/// A lane more, on every laned listener (or on none, if one cannot have it).
fn add(m: &mut Master) -> Result<(), SupervisorError> {
    let mut added = 0;
    let mut failed = None;
    for bound in m.listeners.iter_mut().filter(|bound| bound.is_laned()) {
        match bound.add_lane() {
            Ok(()) => added += 1,
            Err(source) => {
                let address = bound.listener().address();
                failed = Some(SupervisorError::Bind { address, source });
                break;
            }
        }
    }
    if let Some(e) = failed {
        let laned = m.listeners.iter_mut().filter(|bound| bound.is_laned());
        for bound in laned.take(added) {
            bound.remove_lane(m.lanes);
        }
        return Err(e);
    }
    m.lanes += 1;
    Ok(())
}

/// Closes lanes until there are as many as workers to be (at least one), unless a
/// `WINCH` keeps the workers away for now (see the module's documentation).
pub(super) fn trim(lp: &mut Loop<Master>, m: &mut Master) {
    if m.winched.is_some() || m.shutting_down() {
        return;
    }
    while m.lanes > m.target.max(1) {
        // The last lane a worker serves: that worker drains it, and goes with it.
        let lane = (0..m.lanes).rev().find(|&l| served(&m.workers, l));
        close(lp, m, lane.unwrap_or(m.lanes - 1));
    }
}

/// Whether a lane no worker serves (draining ones aside) would keep connections queued
/// for no one: one crashed during a replacement's overlap, say. Not while a `WINCH`
/// keeps the workers away.
pub(super) fn unserved(m: &Master) -> bool {
    m.lanes > 0 && m.winched.is_none() && (0..m.lanes).any(|l| !served(&m.workers, l))
}

/// Closes `lane`: new connections are kept off it, its workers drain (taking in what
/// it queued: a worker is forked for that if none serves it), and the last lane takes
/// its number. Where the kernel moves a closing listener's connections to the others
/// of its group (`net.ipv4.tcp_migrate_req`, Linux 5.14), it is only closed.
fn close(lp: &mut Loop<Master>, m: &mut Master, lane: usize) {
    let mut serving: Vec<Slot> = (m.workers.iter())
        .filter(|(_, w)| w.lane == Some(lane) && w.state != State::Draining)
        .map(|(&slot, _)| slot)
        .collect();
    if !requests_migrate() {
        for bound in m.listeners.iter().filter(|bound| bound.is_laned()) {
            bound.refuse_on_lane(lane);
        }
        // After the filter: what is queued now is all the lane's workers take in.
        if serving.is_empty() {
            serving.extend(take_in(lp, m, lane));
        }
    }
    for bound in m.listeners.iter_mut().filter(|bound| bound.is_laned()) {
        bound.remove_lane(lane);
    }
    for slot in serving {
        retire(lp, m, slot);
    }
    let last = m.lanes - 1;
    for w in m.workers.values_mut() {
        if w.lane == Some(lane) {
            w.lane = None;
        } else if w.lane == Some(last) {
            w.lane = Some(lane);
        }
    }
    m.lanes -= 1;
    log::info!("reuse_port: lane {lane} closed; lanes: {}", m.lanes);
}

/// At shutdown, after new connections were refused: a worker for each lane that has
/// connections queued and no worker (crashing, say), to take them in before the lane's
/// last close resets them. Retired with the others.
pub(super) fn take_in_unserved(lp: &mut Loop<Master>, m: &mut Master) {
    for lane in 0..m.lanes {
        if !served(&m.workers, lane) {
            take_in(lp, m, lane);
        }
    }
}

/// Forks a worker for `lane` if connections wait on it, to take them in (its caller
/// retires it at once; it drains).
fn take_in(lp: &mut Loop<Master>, m: &mut Master, lane: usize) -> Option<Slot> {
    if !queued(m, lane) {
        return None;
    }
    spawn_on(lp, m, None, Some(lane))
        .inspect_err(|e| {
            log::error!(
                "forking a worker to take in what lane {lane} queued: {e}; closing it, which \
                 resets those connections"
            )
        })
        .ok()
}

/// Whether the kernel moves the connections a closing listener queued, and those still
/// in their handshake, to another listener of its `SO_REUSEPORT` group.
fn requests_migrate() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "1")
}

/// Whether a connection waits on `lane` of any laned listener.
fn queued(m: &Master, lane: usize) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let laned = m.listeners.iter().filter(|bound| bound.is_laned());
    let mut fds: Vec<PollFd> = laned
        .filter_map(|bound| bound.sockets().get(lane))
        .map(|socket| PollFd::new(socket.as_fd(), PollFlags::POLLIN))
        .collect();
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) => n > 0,
        Err(e) => {
            log::debug!("poll of lane {lane}: {e}");
            // Cannot tell: a worker that finds nothing costs a fork, not connections.
            true
        }
    }
}
