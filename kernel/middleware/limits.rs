//! Per-call limits, in one tower layer in front of every service:
//! - **Shedding**: at most `max_in_flight` calls at once across the server;
//!   one more is answered RESOURCE_EXHAUSTED at once, with gRPC's
//!   `grpc-retry-pushback-ms` hint, rather than queued. Health checks are
//!   never shed.
//! - **Deadlines**: the sooner of the client's `grpc-timeout` and
//!   `limits.request_timeout_s`, for the whole call, a response stream
//!   included; past it the call ends DEADLINE_EXCEEDED (tonic's own timeout
//!   says CANCELLED) and its work is dropped.
//! - **Buffered request bytes**: the part of a request message that has
//!   arrived but not yet completed is counted against a per-connection and a
//!   per-server budget; a stream that would exceed either is refused
//!   RESOURCE_EXHAUSTED, so half-sent messages cannot pile up in memory.
//!   (A message's own size is bounded by `limits.max_message_mib`.)

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use futures_util::future::BoxFuture;
use http_body::{Body as HttpBody, Frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, body::Body};

use super::connections::{ConnectionInfo, ConnectionState};

#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub max_in_flight: usize,
    pub request_timeout: Duration,
    pub max_buffered_bytes: usize,
    pub max_buffered_bytes_per_connection: usize,
    /// What a shed client is told to wait before retrying.
    pub retry_after: Duration,
}

/// The client's deadline is cut this much short, so that this layer answers
/// before tonic's own timeout (which wraps it and says CANCELLED).
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone)]
pub struct CallLimitsLayer {
    shared: Arc<Shared>,
}

struct Shared {
    limits: CallLimits,
    in_flight: Arc<Semaphore>,
    buffered: AtomicUsize,
}

impl CallLimitsLayer {
    pub fn new(limits: CallLimits) -> Self {
        CallLimitsLayer {
            shared: Arc::new(Shared {
                limits,
                in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
                buffered: AtomicUsize::new(0),
            }),
        }
    }

    /// Request bytes buffered across the server now.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.buffered.load(Ordering::Relaxed)
    }
}

impl<S> tower::Layer<S> for CallLimitsLayer {
    type Service = CallLimitsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLimitsService { inner, shared: self.shared.clone() }
    }
}

#[derive(Clone)]
pub struct CallLimitsService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Held for a call's whole life (its response stream included).
struct CallGuard {
    _slot: Option<OwnedSemaphorePermit>,
    connection: Option<Arc<ConnectionState>>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(connection) = &self.connection {
            connection.call_ended();
        }
    }
}

impl<S> tower::Service<http::Request<Body>> for CallLimitsService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let limits = self.shared.limits;
        let health = request.uri().path().starts_with(HEALTH_PREFIX);
        let slot = match self.shared.in_flight.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if health => None,
            Err(_) => {
                let mut status = Status::resource_exhausted(format!(
                    "the server is at limits.max_in_flight ({}) calls; retry after {} ms",
                    limits.max_in_flight,
                    limits.retry_after.as_millis()
                ));
                if let Ok(value) = limits.retry_after.as_millis().to_string().parse() {
                    status.metadata_mut().insert("grpc-retry-pushback-ms", value);
                }
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let connection = request.extensions().get::<ConnectionInfo>().map(|c| c.state.clone());
        if let Some(connection) = &connection {
            connection.call_started();
        }
        let guard = CallGuard { _slot: slot, connection: connection.clone() };
        let timeout = match client_timeout(request.headers()) {
            Some(client) => client.saturating_sub(DEADLINE_MARGIN).min(limits.request_timeout),
            None => limits.request_timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let request = request.map(|body| {
            Body::new(Metered { inner: body, shared: self.shared.clone(), connection, framing: Framing::default() })
        });
        let future = super::take_ready(&mut self.inner).call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, future).await {
                Err(_) => Ok(deadline_exceeded(timeout).into_http()),
                Ok(Err(e)) => Err(e),
                Ok(Ok(response)) => Ok(response.map(|body| {
                    Body::new(Deadlined {
                        inner: body,
                        sleep: Box::pin(tokio::time::sleep_until(deadline)),
                        timeout,
                        _guard: guard,
                    })
                })),
            }
        })
    }
}

fn deadline_exceeded(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the call ran past its deadline of {:.3} s (the client's grpc-timeout or limits.request_timeout_s)",
        timeout.as_secs_f64()
    ))
}

/// gRPC's `grpc-timeout` header: up to 8 digits and a unit.
fn client_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok().filter(|_| digits.len() <= 8)?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3_600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Where a request body is in gRPC's length-prefixed framing (a 1-byte flag
/// and a 4-byte big-endian length before each message).
#[derive(Default)]
struct Framing {
    header: [u8; 5],
    /// Bytes of the next message's header seen, while `remaining` is 0.
    header_len: usize,
    /// Bytes of the current message's body still to come.
    remaining: usize,
    /// Bytes of the current, incomplete message (header included) passed on.
    held: usize,
}

impl Framing {
    /// Follows `data` through the framing; returns the bytes of the
    /// messages it completed (earlier chunks of them included), which the
    /// decoder takes from here.
    fn advance(&mut self, mut data: &[u8]) -> usize {
        let mut released = 0;
        while !data.is_empty() {
            let take = if self.remaining == 0 {
                let take = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                if self.header_len == 5 {
                    self.header_len = 0;
                    self.remaining = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes")) as usize;
                }
                take
            } else {
                let take = self.remaining.min(data.len());
                self.remaining -= take;
                take
            };
            self.held += take;
            data = &data[take..];
            if self.remaining == 0 && self.header_len == 0 {
                released += std::mem::take(&mut self.held);
            }
        }
        released
    }
}

/// A request body that counts what it has passed on of incomplete messages.
struct Metered {
    inner: Body,
    shared: Arc<Shared>,
    connection: Option<Arc<ConnectionState>>,
    framing: Framing,
}

impl Metered {
    fn release(&self, bytes: usize) {
        self.shared.buffered.fetch_sub(bytes, Ordering::Relaxed);
        if let Some(c) = &self.connection {
            c.buffered.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Counts `data`; an error once either budget would be exceeded.
    fn count(&mut self, data: &Bytes) -> Result<(), Status> {
        let added = data.len();
        let released = self.framing.advance(data.chunk());
        let server = self.shared.buffered.fetch_add(added, Ordering::Relaxed) + added;
        let connection = self.connection.as_ref().map_or(0, |c| c.buffered.fetch_add(added, Ordering::Relaxed) + added);
        self.release(released);
        let (server, connection) = (server - released, connection.saturating_sub(released));
        let (held, limits) = (self.framing.held, &self.shared.limits);
        if held > 0 && server > limits.max_buffered_bytes {
            return Err(Status::resource_exhausted(format!(
                "the server holds limits.max_buffered_request_mib of partly received messages; this call's \
                 {held} bytes are refused, retry later"
            )));
        }
        if held > 0 && connection > limits.max_buffered_bytes_per_connection {
            return Err(Status::resource_exhausted(format!(
                "this connection holds more than limits.max_buffered_request_mib_per_connection of partly \
                 received messages; finish sending them before starting more ({held} bytes in this call)"
            )));
        }
        Ok(())
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.release(self.framing.held);
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = self.count(data)
                {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends with DEADLINE_EXCEEDED at the deadline, and
/// holds the call's slot until it ends.
struct Deadlined {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    _guard: CallGuard,
}

impl HttpBody for Deadlined {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.inner.is_end_stream() || self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let mut trailers = http::HeaderMap::new();
        // Cannot fail: the status' own header values.
        let _ = deadline_exceeded(self.timeout).add_header(&mut trailers);
        self.inner = Body::empty();
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_holds_only_incomplete_messages() {
        let mut framing = Framing::default();
        let message = |len: u32| [&[0u8][..], &len.to_be_bytes()].concat();
        // A 10-byte message whose header and body arrive in pieces.
        assert_eq!(framing.advance(&message(10)[..3]), 0);
        assert_eq!(framing.advance(&message(10)[3..]), 0);
        assert_eq!(framing.held, 5);
        assert_eq!(framing.advance(&[7u8; 6]), 0);
        assert_eq!(framing.held, 11);
        // The last 4 bytes complete it, and the next message starts in the same chunk.
        let chunk = [&[7u8; 4][..], &message(100)[..], &[1u8; 20][..]].concat();
        assert_eq!(framing.advance(&chunk), 15);
        assert_eq!(framing.held, 25);
        // An empty message is complete at its header.
        let mut empty = Framing::default();
        assert_eq!(empty.advance(&message(0)), 5);
        assert_eq!(empty.held, 0);
    }

    /// A response stream that never ends.
    struct Endless;

    impl HttpBody for Endless {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_response_stream_ends_deadline_exceeded_at_the_deadline() {
        let timeout = Duration::from_millis(20);
        let mut body = Deadlined {
            inner: Body::new(Endless),
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            _guard: CallGuard { _slot: None, connection: None },
        };
        let started = std::time::Instant::now();
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await.unwrap().unwrap();
        assert!(started.elapsed() >= timeout);
        let trailers = frame.into_trailers().expect("trailers end the stream");
        assert_eq!(trailers.get("grpc-status").unwrap(), "4", "DEADLINE_EXCEEDED");
        assert!(body.is_end_stream());
    }

    #[test]
    fn grpc_timeout_headers() {
        let headers = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            h
        };
        assert_eq!(client_timeout(&headers("250m")), Some(Duration::from_millis(250)));
        assert_eq!(client_timeout(&headers("2S")), Some(Duration::from_secs(2)));
        assert_eq!(client_timeout(&headers("1H")), Some(Duration::from_secs(3_600)));
        assert_eq!(client_timeout(&headers("123456789S")), None, "at most 8 digits");
        assert_eq!(client_timeout(&headers("5x")), None);
        assert_eq!(client_timeout(&http::HeaderMap::new()), None);
    }
}
