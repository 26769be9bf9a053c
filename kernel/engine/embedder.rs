//! The embedding engine: the encoder worker running a sentence embedder.

use std::path::Path;

use super::encoder::{EncodeTimings, EncoderEngine, EncoderModel, EncoderOptions};
use crate::{
    backend::Device,
    error::Result,
    model::sentence::{SentenceEmbedder, Tokens},
};

pub type EmbeddingEngine = EncoderEngine<SentenceEmbedder>;

impl EncoderModel for SentenceEmbedder {
    fn run(&self, device: &Device, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>> {
        self.embed_tokens(device, batch)
    }

    fn version(&self) -> &str {
        SentenceEmbedder::version(self)
    }
}

impl EncoderEngine<SentenceEmbedder> {
    /// Loads the model from a sentence-transformers folder and starts its worker.
    pub fn load(device: Device, dir: &Path, options: EncoderOptions) -> Result<Self> {
        let model = SentenceEmbedder::load_in(&device, dir, options.precision)?;
        let engine = EncoderEngine::start(device, model, options, "embedding")?;
        tracing::info!(model = engine.version(), dimension = engine.dimension(), "embedding model loaded");
        Ok(engine)
    }

    pub fn dimension(&self) -> usize {
        self.model().dimension()
    }

    pub fn tokenize(&self, text: &str) -> Result<Tokens> {
        self.model().tokenize(text)
    }

    /// Embeds texts; vectors come back in input order.
    pub async fn embed(&self, texts: &[&str]) -> Result<(Vec<Vec<f32>>, EncodeTimings)> {
        let tokens = texts.iter().map(|t| self.tokenize(t)).collect::<Result<Vec<_>>>()?;
        self.run(tokens).await
    }
}
