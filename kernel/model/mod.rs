//! Model architectures, each written once against the backend's ops.

pub mod bert;
pub mod chat;
pub mod checkpoint;
pub mod cross_encoder;
pub mod gguf;
pub mod hf_folder;
pub mod llama;
pub mod lora;
pub mod moe;
pub mod sentence;
pub mod weights;
