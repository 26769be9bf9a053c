//! Accepted connections, bounded: at most `max_connections` at once (one
//! over the cap is closed as soon as it is accepted), and a connection with
//! no call in flight is closed after `idle_timeout`, or after
//! `handshake_timeout` if it never made a call. Idle connections would
//! otherwise hold a slot forever: the server's keepalive pings count as
//! traffic, so the clock here is the calls, not the bytes.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
}

/// What the request layer tells a connection, and what it keeps per
/// connection: calls in flight and request bytes buffered.
#[derive(Debug)]
pub struct ConnectionState {
    in_flight: AtomicUsize,
    served: AtomicBool,
    /// When `in_flight` last fell to 0 (or the connection opened).
    idle_since: Mutex<Instant>,
    pub(super) buffered: AtomicUsize,
}

impl ConnectionState {
    fn new() -> Self {
        ConnectionState {
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            buffered: AtomicUsize::new(0),
        }
    }

    pub(super) fn call_started(&self) {
        self.served.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn call_ended(&self) {
        let mut since = self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *since = Instant::now();
        }
    }

    /// When the connection times out if nothing changes; None while a call
    /// is in flight.
    fn expires_at(&self, limits: &ConnectionLimits) -> Option<Instant> {
        let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let timeout = if self.served.load(Ordering::Relaxed) { limits.idle_timeout } else { limits.handshake_timeout };
        Some(since + timeout)
    }
}

/// The request extension every call on a tracked connection carries.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub tcp: TcpConnectInfo,
    pub state: Arc<ConnectionState>,
}

/// An accepted TCP stream that holds its slot and closes itself when idle.
pub struct Tracked {
    io: TcpStream,
    state: Arc<ConnectionState>,
    limits: ConnectionLimits,
    timer: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Tracked {
    /// Whether the connection has been idle past its timeout; otherwise the
    /// timer is armed for the next moment it could be.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            match self.state.expires_at(&self.limits) {
                Some(at) if at <= now => return true,
                Some(at) => self.timer.as_mut().reset(at),
                // Busy: look again after the shorter of the two timeouts.
                None => self.timer.as_mut().reset(now + self.limits.idle_timeout.min(self.limits.handshake_timeout)),
            }
        }
    }
}

impl Connected for Tracked {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo { tcp: self.io.connect_info(), state: self.state.clone() }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.timed_out(cx) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle past its timeout")));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The listener's connections, each tracked; those over the cap closed.
/// Refusals are logged at most once a second, with their count: a flood of
/// connections must not become a flood of log lines.
pub fn tracked(incoming: TcpIncoming, limits: ConnectionLimits) -> impl Stream<Item = io::Result<Tracked>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (mut refused, mut last_warned) = (0u64, None::<Instant>);
    incoming.filter_map(move |accepted| {
        let tracked = match accepted {
            Err(e) => Some(Err(e)),
            Ok(io) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let state = Arc::new(ConnectionState::new());
                    let timer = Box::pin(tokio::time::sleep(limits.handshake_timeout));
                    Some(Ok(Tracked { io, state, limits, timer, _slot: slot }))
                }
                Err(_) => {
                    refused += 1;
                    if last_warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(
                            peer = ?io.peer_addr().ok(),
                            refused,
                            max = limits.max_connections,
                            "connections refused: the server holds limits.max_connections connections"
                        );
                        (refused, last_warned) = (0, Some(Instant::now()));
                    }
                    None
                }
            },
        };
        futures_util::future::ready(tracked)
    })
}
