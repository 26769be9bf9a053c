//! aitl: an inference-and-feedback microkernel for LLM-based customer
//! support, serving the Agent-in-the-Loop data flywheel.

pub mod proto {
    tonic::include_proto!("aitl.v1");

    /// The API's descriptor set: server reflection and JSON views of records.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/aitl_descriptor.bin"));
}

pub mod trainlog;

pub mod api;
pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod eval_server;
pub mod feedback;
pub mod kb;
pub mod keys;
pub mod load;
pub mod middleware;
pub mod model;
pub mod privacy;
pub mod provision;
pub mod registry;
pub mod remote;
pub mod server;
pub mod serving;
pub mod tenancy;
pub mod worker;
