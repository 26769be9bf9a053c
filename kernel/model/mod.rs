//! Model architectures, each written once against the backend's ops.

pub mod bert;
pub mod sentence;
pub mod weights;
