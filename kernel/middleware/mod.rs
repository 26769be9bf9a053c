//! What stands between the network and the services: the connection
//! limits on accepted sockets and the per-call limits in one tower layer
//! (shedding, deadlines, buffered request bytes). Both are sized by
//! `[limits]` and keep memory bounded whatever clients send.

pub mod connections;
pub mod limits;

pub use connections::{ConnectionInfo, ConnectionLimits, tracked};
pub use limits::{CallLimits, CallLimitsLayer};
