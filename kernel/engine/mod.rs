//! The runtime around models: per-device worker threads that own a model,
//! and the batchers that feed them.

pub mod embedder;

pub use embedder::{EmbedderOptions, EmbeddingEngine};
