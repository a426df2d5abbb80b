/* libev 4 driven the way forkloop's benches drive forkloop (benches/backends.rs), so
 * that both run in one process, side by side. The per-event work (libevent's bench.c
 * round) is written here in C, as libev's own benchmark does it: no FFI call per
 * callback. Every loop is ev_loop_new(EVBACKEND_EPOLL | EVFLAG_NOENV): epoll, whatever
 * LIBEV_FLAGS says. */
#include <errno.h>
#include <ev.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

struct fl_ev {
    struct ev_loop *loop;
    /* bench.c: a read watch per reader; writers[i] makes reader i readable. */
    ev_io *ios;
    ev_timer *idle; /* per-fd idle timeouts, or NULL */
    const int *readers;
    const int *writers;
    size_t n;
    size_t read, left;
    /* one-shot timers */
    ev_timer *timers;
    size_t ntimers, fired;
    /* signal latency */
    ev_signal sig;
    int got;
};

struct fl_ev *fl_ev_new(void) {
    struct fl_ev *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    b->loop = ev_loop_new(EVBACKEND_EPOLL | EVFLAG_NOENV);
    if (!b->loop || ev_backend(b->loop) != EVBACKEND_EPOLL) {
        if (b->loop)
            ev_loop_destroy(b->loop);
        free(b);
        return NULL;
    }
    return b;
}

void fl_ev_free(struct fl_ev *b) {
    size_t i;
    for (i = 0; b->ios && i < b->n; i++) {
        ev_io_stop(b->loop, &b->ios[i]);
        if (b->idle)
            ev_timer_stop(b->loop, &b->idle[i]);
    }
    for (i = 0; i < b->ntimers; i++)
        ev_timer_stop(b->loop, &b->timers[i]);
    if (ev_is_active(&b->sig))
        ev_signal_stop(b->loop, &b->sig);
    ev_loop_destroy(b->loop);
    free(b->ios);
    free(b->idle);
    free(b->timers);
    free(b);
}

static void on_readable(struct ev_loop *loop, ev_io *w, int revents) {
    struct fl_ev *b = ev_userdata(loop);
    size_t i = (size_t)(w - b->ios);
    char buf[64];
    ssize_t got = read(w->fd, buf, sizeof buf);
    (void)revents;
    if (got > 0)
        b->read += (size_t)got;
    if (b->left > 0) {
        b->left--;
        (void)!write(b->writers[(i + 1) % b->n], "e", 1);
    }
    if (b->idle)
        ev_timer_again(loop, &b->idle[i]); /* push the idle timeout back */
}

static void on_idle(struct ev_loop *loop, ev_timer *w, int revents) {
    (void)loop, (void)w, (void)revents;
}

/* Starts a read watch on each of n readers (and a 600 s idle timer beside each if
 * `timeouts`). Like every libev watcher start, nothing reaches the kernel until the
 * loop next runs (fl_ev_run_nowait). 0, or -1 if out of memory. */
int fl_ev_watch_reads(struct fl_ev *b, const int *readers, const int *writers, size_t n,
                      int timeouts) {
    size_t i;
    if (b->ios)
        return -1; /* once per fl_ev: its watchers are started */
    b->ios = calloc(n, sizeof *b->ios);
    b->idle = timeouts ? calloc(n, sizeof *b->idle) : NULL;
    if (!b->ios || (timeouts && !b->idle))
        return -1;
    b->readers = readers;
    b->writers = writers;
    b->n = n;
    ev_set_userdata(b->loop, b);
    for (i = 0; i < n; i++) {
        ev_io_init(&b->ios[i], on_readable, readers[i], EV_READ);
        ev_io_start(b->loop, &b->ios[i]);
        if (timeouts) {
            ev_timer_init(&b->idle[i], on_idle, 0., 600.);
            ev_timer_again(b->loop, &b->idle[i]);
        }
    }
    return 0;
}

void fl_ev_run_nowait(struct fl_ev *b) { ev_run(b->loop, EVRUN_NOWAIT); }

/* One bench.c round: `active` readers get a byte, each read forwards one while the
 * round's budget of `active` more writes lasts, until all 2 * active bytes are read. */
void fl_ev_round(struct fl_ev *b, size_t active) {
    size_t k, spacing = b->n / active;
    b->read = 0;
    b->left = active;
    for (k = 0; k < active; k++)
        (void)!write(b->writers[k * spacing], "e", 1);
    while (b->read < 2 * active)
        ev_run(b->loop, EVRUN_ONCE);
}

/* Stops and starts every read watch again (ev_io_stop + ev_io_start, the same fd and
 * events), then runs the loop once without waiting, which is when libev tells the
 * kernel about changes (here: none, the mask is unchanged). */
void fl_ev_restart_all(struct fl_ev *b) {
    size_t i;
    for (i = 0; i < b->n; i++) {
        ev_io_stop(b->loop, &b->ios[i]);
        ev_io_start(b->loop, &b->ios[i]);
    }
    ev_run(b->loop, EVRUN_NOWAIT);
}

/* Flips every read watch between EV_READ and EV_READ | EV_WRITE (stop, set, start: the
 * way libev changes a watcher's events), then runs the loop once without waiting: one
 * epoll_ctl(MOD) per fd there, and, with WRITE, the write events it reports. */
void fl_ev_toggle_all(struct fl_ev *b, int both) {
    size_t i;
    for (i = 0; i < b->n; i++) {
        ev_io *w = &b->ios[i];
        ev_io_stop(b->loop, w);
        ev_io_set(w, w->fd, both ? EV_READ | EV_WRITE : EV_READ);
        ev_io_start(b->loop, w);
    }
    ev_run(b->loop, EVRUN_NOWAIT);
}

static void on_timer(struct ev_loop *loop, ev_timer *w, int revents) {
    struct fl_ev *b = ev_userdata(loop);
    (void)w, (void)revents;
    b->fired++;
}

/* Arms n one-shot timers, delays[i] seconds from the loop's time, read once before
 * (libev arms relative to its cached ev_now). The watcher array is allocated once per
 * count. 0, or -1 if out of memory. */
int fl_ev_timers_arm(struct fl_ev *b, const double *delays, size_t n) {
    size_t i;
    /* Timers of an earlier arming still pending sit in the loop's heap: stop them before
     * their memory is freed or re-initialised (ev_timer_init on an active watcher). */
    for (i = 0; i < b->ntimers; i++)
        ev_timer_stop(b->loop, &b->timers[i]);
    if (b->ntimers != n) {
        free(b->timers);
        b->timers = n ? calloc(n, sizeof *b->timers) : NULL;
        if (n && !b->timers) {
            b->ntimers = 0;
            return -1;
        }
        b->ntimers = n;
    }
    ev_set_userdata(b->loop, b);
    b->fired = 0;
    ev_now_update(b->loop);
    for (i = 0; i < n; i++) {
        ev_timer_init(&b->timers[i], on_timer, delays[i], 0.);
        ev_timer_start(b->loop, &b->timers[i]);
    }
    return 0;
}

/* Runs the loop until every armed timer fired; how many did. */
size_t fl_ev_timers_fire(struct fl_ev *b) {
    while (b->fired < b->ntimers)
        ev_run(b->loop, EVRUN_ONCE);
    return b->fired;
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents) {
    struct fl_ev *b = ev_userdata(loop);
    (void)w, (void)revents;
    b->got = 1;
}

void fl_ev_signal_start(struct fl_ev *b, int signo) {
    ev_set_userdata(b->loop, b);
    ev_signal_init(&b->sig, on_signal, signo);
    ev_signal_start(b->loop, &b->sig);
}

void fl_ev_signal_stop(struct fl_ev *b) { ev_signal_stop(b->loop, &b->sig); }

/* raise, then run the loop until the callback ran: one signal's latency. */
void fl_ev_signal_once(struct fl_ev *b) {
    b->got = 0;
    raise(b->sig.signum);
    while (!b->got)
        ev_run(b->loop, EVRUN_ONCE);
}

/* What a forked child does first: ev_loop_fork, then one ev_run(EVRUN_NOWAIT), in which
 * libev makes a new epoll fd and adds every watched fd to it again. */
void fl_ev_post_fork_run(struct fl_ev *b) {
    ev_loop_fork(b->loop);
    ev_run(b->loop, EVRUN_NOWAIT);
}

/* fork; the child does fl_ev_post_fork_run and _exits; the parent waits for it.
 * 0 if the child did, -1 if the fork or the wait failed. */
int fl_ev_fork_round_trip(struct fl_ev *b) {
    int status;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        fl_ev_post_fork_run(b);
        _exit(0);
    }
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}
