//! What stands between the network and the services: the connection
//! limits on accepted sockets, then two tower layers: authentication and
//! roles, and the per-call limits (shedding, deadlines, buffered request
//! bytes). Both are sized by
//! `[limits]` and keep memory bounded whatever clients send.

pub mod auth;
pub mod connections;
pub mod limits;

pub use auth::{AuthLayer, Keys};

/// The service to call now, leaving a fresh clone in its place for the next
/// `poll_ready` (tower's pattern for services that are cloned per call).
fn take_ready<S: Clone>(service: &mut S) -> S {
    let clone = service.clone();
    std::mem::replace(service, clone)
}
pub use connections::{ConnectionInfo, ConnectionLimits, tracked};
pub use limits::{CallLimits, CallLimitsLayer};
