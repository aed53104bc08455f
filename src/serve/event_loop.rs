//! The serve loop: wait, read every pending event, answer, retry.
//!
//! It sleeps in one `ppoll` on the userfaultfd, the fetch workers' eventfd,
//! the stop eventfd, the VM's pidfd and the handshake connection. After a
//! wake-up it reads events until none is left, batch by batch, so that a
//! REMOVE is read (and Firecracker's `madvise` released) as soon as
//! possible. Deferred installs are retried after every read, since a read
//! is what lets the kernel accept them again; while any wait, the `ppoll`
//! timeout is their backoff delay, so a retry happens even if no other
//! event ever comes.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use super::install::Answer;
use super::{End, ServeError, Session};
use crate::sys::poll::{HANGUP, PollFd, READABLE, poll};
use crate::sys::uffd::{Event, EventBuf};

/// Batches read in a row before fetches and retries get a turn.
const MAX_BATCHES: usize = 64;

/// How often a test-held install-ahead is looked at again.
const HELD_AHEAD_POLL: Duration = Duration::from_millis(1);

/// What a wake-up reported.
#[derive(Default)]
struct Ready {
    uffd: bool,
    fetched: bool,
    stop: bool,
    peer_exited: bool,
    conn: bool,
}

/// Runs the loop until the session ends.
pub(super) fn run(s: &Session) -> Result<End, ServeError> {
    let mut answer = Answer::new(s)?;
    let mut buf = EventBuf::new(s.config.batch);
    let mut events: Vec<Event> = Vec::with_capacity(s.config.batch.max(1));
    let mut conn = s.conn.as_ref();
    loop {
        // While install-ahead has work, only look for events, do not sleep.
        let held = s
            .hooks
            .ahead_allowed
            .as_ref()
            .is_some_and(|allowed| !allowed());
        let ahead = answer.ahead.pending() && !held;
        let timeout = match (ahead, held, answer.deferred.timeout()) {
            (true, _, _) => Some(Duration::ZERO),
            // A test holds install-ahead back: look again now and then.
            (false, true, t) => Some(t.unwrap_or(HELD_AHEAD_POLL).min(HELD_AHEAD_POLL)),
            (false, false, t) => t,
        };
        let ready = wait(s, &answer, conn, timeout)?;
        if ready.stop {
            return Err(ServeError::Stopped);
        }
        if ready.peer_exited {
            return Ok(End::PeerExited);
        }
        if ready.conn && connection_closed(conn) {
            tracing::info!("handshake connection closed");
            conn = None;
            if s.pidfd.is_none() {
                return Ok(End::ConnectionClosed);
            }
        }
        if ready.fetched {
            if let Some(end) = answer.finish_fetches()? {
                return Ok(end);
            }
        }
        if ready.uffd || !answer.deferred.is_empty() {
            if let Some(end) = drain(s, &mut answer, &mut buf, &mut events)? {
                return Ok(end);
            }
        }
        if let Some(end) = answer.retry_deferred()? {
            return Ok(end);
        }
        if ahead {
            if let Some(end) = answer.ahead.step(s)? {
                return Ok(end);
            }
        }
    }
}

/// Reads and answers events until none is pending, then keeps polling
/// without sleeping for `config.spin` in case more come at once.
fn drain(
    s: &Session,
    answer: &mut Answer<'_>,
    buf: &mut EventBuf,
    events: &mut Vec<Event>,
) -> Result<Option<End>, ServeError> {
    let mut idle_since: Option<Instant> = None;
    let mut batches = 0;
    loop {
        if let Some(hook) = &s.hooks.before_read {
            hook();
        }
        let n = s
            .uffd
            .read_events(buf, events)
            .map_err(|source| ServeError::Read { source })?;
        if n > 0 {
            idle_since = None;
            if let Some(end) = answer.batch(events)? {
                return Ok(Some(end));
            }
            batches += 1;
            if batches == MAX_BATCHES {
                // Still busy: let finished fetches and deferred retries
                // have a turn; the descriptor stays readable, so the next
                // wait returns at once.
                return Ok(None);
            }
            if n < buf.capacity() && s.config.spin.is_zero() {
                // A short read emptied the queue: the next `ppoll` tells
                // of new events as cheaply as another read would, and
                // sleeps if there are none.
                return Ok(None);
            }
            continue;
        }
        if s.config.spin.is_zero() || !answer.deferred.is_empty() {
            return Ok(None);
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= s.config.spin {
            return Ok(None);
        }
        std::hint::spin_loop();
    }
}

fn wait(
    s: &Session,
    answer: &Answer<'_>,
    conn: Option<&std::os::unix::net::UnixStream>,
    timeout: Option<std::time::Duration>,
) -> Result<Ready, ServeError> {
    let mut fds = [
        PollFd::new(s.uffd.as_fd(), READABLE),
        PollFd::new(answer.pool.wake_fd().as_fd(), READABLE),
        PollFd::new(s.stop.as_fd(), READABLE),
        PollFd::new(s.uffd.as_fd(), 0),
        PollFd::new(s.uffd.as_fd(), 0),
    ];
    let mut n = 3;
    let pid_slot = s.pidfd.as_ref().map(|p| {
        fds[n] = PollFd::new(p.as_fd(), READABLE);
        n += 1;
        n - 1
    });
    let conn_slot = conn.map(|c| {
        fds[n] = PollFd::new(c.as_fd(), READABLE);
        n += 1;
        n - 1
    });
    poll(&mut fds[..n], timeout).map_err(|source| ServeError::Poll { source })?;
    Ok(Ready {
        uffd: fds[0].ready(),
        fetched: fds[1].ready(),
        stop: fds[2].ready(),
        peer_exited: pid_slot.is_some_and(|i| fds[i].ready()),
        conn: conn_slot.is_some_and(|i| fds[i].revents() & (READABLE | HANGUP) != 0),
    })
}

/// Reads what the connection has; true on EOF or error. Firecracker never
/// sends after the handshake, so any bytes are dropped.
fn connection_closed(conn: Option<&std::os::unix::net::UnixStream>) -> bool {
    let Some(mut conn) = conn else { return false };
    let mut scratch = [0u8; 256];
    match conn.read(&mut scratch) {
        Ok(0) => true,
        Ok(n) => {
            tracing::debug!(bytes = n, "ignoring bytes sent after the handshake");
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
        Err(_) => true,
    }
}
