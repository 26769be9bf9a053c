//! Loading the configured models off the async workers; the server loads
//! them at start and `follow` when the registry changes.

use std::sync::Arc;

use crate::{
    config::{Config, RankerChoice},
    engine::{EmbeddingEngine, EncoderOptions, GeneratorEngine, GeneratorOptions, Ranker},
    error::{Error, Result},
    kb::SemanticIndex,
};

/// Starts the configured embedding model (fetching the default on first
/// use); None when the config says "none".
pub async fn embedder(config: &Config) -> Result<Option<EmbeddingEngine>> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let Some(dir) = config.embedder_dir()? else {
            tracing::warn!("no embedding model configured: Retrieve answers UNAVAILABLE");
            return Ok(None);
        };
        let options = EncoderOptions {
            token_budget: config.models.embed_token_budget,
            queue_capacity: config.models.embed_queue_capacity,
            precision: config.models.encoder_precision,
        };
        EmbeddingEngine::load(config.device()?, &dir, options).map(Some)
    })
    .await
    .map_err(|e| Error::Internal(format!("loading the embedding model: {e}")))?
}

/// Starts the configured generator (fetching the default on first use).
pub async fn generator(config: &Config) -> Result<Option<GeneratorEngine>> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let Some(path) = config.generator_path()? else {
            tracing::warn!("no generator configured: Generate answers UNAVAILABLE");
            return Ok(None);
        };
        let options = GeneratorOptions {
            queue_capacity: config.models.generate_queue_capacity,
            max_sequences: config.models.max_decoding_sequences,
            prefill: config.models.generator_precision,
            prefill_chunk: config.models.prefill_chunk_tokens,
        };
        GeneratorEngine::load(config.generator_device()?, &path, options).map(Some)
    })
    .await
    .map_err(|e| Error::Internal(format!("loading the generator: {e}")))?
}

/// Starts the configured ranker: a cross-encoder folder, or the embedding
/// model's similarity (cold start) when one is loaded.
pub async fn ranker(config: &Config, semantic: Option<&Arc<SemanticIndex>>) -> Result<Option<Ranker>> {
    match config.ranker() {
        RankerChoice::None => {
            tracing::warn!("no ranker configured: Rank answers UNAVAILABLE");
            Ok(None)
        }
        RankerChoice::Similarity => {
            if semantic.is_none() {
                tracing::warn!("the similarity ranker needs an embedding model: Rank answers UNAVAILABLE");
            }
            Ok(semantic.map(|s| Ranker::similarity(s.clone())))
        }
        RankerChoice::CrossEncoder(dir) => {
            let model = config.cross_encoder_options()?;
            let options = EncoderOptions {
                token_budget: config.models.embed_token_budget,
                queue_capacity: config.models.embed_queue_capacity,
                precision: config.models.encoder_precision,
            };
            let device = config.device()?;
            tokio::task::spawn_blocking(move || Ranker::cross_encoder(device, &dir, &model, options).map(Some))
                .await
                .map_err(|e| Error::Internal(format!("loading the cross-encoder: {e}")))?
        }
    }
}
