//! The runtime around models: per-device worker threads that own a model,
//! and the batchers that feed them.

pub mod embedder;
pub mod encoder;
pub mod generator;
pub mod grounding;
pub mod ranker;
pub mod sampler;

pub use embedder::EmbeddingEngine;
pub use encoder::{EncodeTimings, EncoderEngine, EncoderOptions};
pub use generator::{GeneratorEngine, GeneratorOptions};
pub use ranker::Ranker;
