//! Rank's scorers. A configured cross-encoder reads each (query, passage)
//! pair on the encoder worker. Until one is configured (or the flywheel has
//! trained one), Rank falls back to the embedding model's cosine similarity
//! and says so in the version it reports: that is the baseline a trained
//! ranker must beat.

use std::{path::Path, sync::Arc};

use super::encoder::{EncodeTimings, EncoderEngine, EncoderModel, EncoderOptions};
use crate::{
    backend::Device,
    error::{Error, Result},
    kb::SemanticIndex,
    model::{
        bert::Tokens,
        cross_encoder::{CrossEncoder, CrossEncoderOptions},
    },
};

impl EncoderModel for CrossEncoder {
    fn run(&self, device: &Device, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>> {
        self.score_tokens(device, batch)
    }

    fn version(&self) -> &str {
        CrossEncoder::version(self)
    }
}

/// One thing to score: its text and, for a knowledge object, which version
/// (so a stored vector can stand in for re-embedding it).
#[derive(Debug, Clone, Copy)]
pub struct Passage<'a> {
    pub text: &'a str,
    pub knowledge: Option<(&'a str, u64)>,
}

pub enum Ranker {
    CrossEncoder(EncoderEngine<CrossEncoder>),
    Similarity { semantic: Arc<SemanticIndex>, version: String },
}

impl Ranker {
    /// Loads a cross-encoder folder and starts its worker.
    pub fn cross_encoder(
        device: Device,
        dir: &Path,
        model: &CrossEncoderOptions,
        options: EncoderOptions,
    ) -> Result<Self> {
        let model = CrossEncoder::load(&device, dir, model)?;
        tracing::info!(
            model = model.version(),
            labels = ?model.labels(),
            activation = ?model.activation(),
            max_length = model.max_length(),
            "cross-encoder loaded"
        );
        Ok(Ranker::CrossEncoder(EncoderEngine::start(device, model, options, "ranking")?))
    }

    /// The cold-start ranker over the serving embedding model.
    pub fn similarity(semantic: Arc<SemanticIndex>) -> Self {
        let version = format!("similarity:{}", semantic.model_version());
        Ranker::Similarity { semantic, version }
    }

    /// The device that scores: the cross-encoder's, or the embedding model's.
    pub fn device(&self) -> &crate::backend::Device {
        match self {
            Ranker::CrossEncoder(engine) => engine.device(),
            Ranker::Similarity { semantic, .. } => semantic.engine().device(),
        }
    }

    /// What Rank reports as its ranker: the cross-encoder's version, or
    /// `similarity:{embedder version}` for the cold-start fallback.
    pub fn version(&self) -> &str {
        match self {
            Ranker::CrossEncoder(engine) => engine.version(),
            Ranker::Similarity { version, .. } => version,
        }
    }

    /// The embedding model a similarity ranker scored with.
    pub fn embedder_version(&self) -> Option<&str> {
        match self {
            Ranker::CrossEncoder(_) => None,
            Ranker::Similarity { semantic, .. } => Some(semantic.model_version()),
        }
    }

    /// One score per passage, in input order; higher is better. Passages
    /// that are knowledge objects are the `tenant`'s.
    pub async fn score(
        &self,
        tenant: &str,
        query: &str,
        passages: &[Passage<'_>],
    ) -> Result<(Vec<f32>, EncodeTimings)> {
        match self {
            Ranker::CrossEncoder(engine) => {
                let texts: Vec<&str> = passages.iter().map(|p| p.text).collect();
                let pairs = engine.model().tokenize_pairs(query, &texts)?;
                let (rows, timings) = engine.run(pairs).await?;
                Ok((rows.iter().map(|r| engine.model().ranking_score(r)).collect(), timings))
            }
            Ranker::Similarity { semantic, .. } => similarity(semantic, tenant, query, passages).await,
        }
    }
}

/// Cosine similarity of unit vectors; knowledge objects whose current vector
/// is in the index are not embedded again.
async fn similarity(
    semantic: &SemanticIndex,
    tenant: &str,
    query: &str,
    passages: &[Passage<'_>],
) -> Result<(Vec<f32>, EncodeTimings)> {
    let mut vectors: Vec<Option<Vec<f32>>> = passages
        .iter()
        .map(|p| p.knowledge.and_then(|(id, version)| semantic.stored_vector(tenant, id, version)))
        .collect();
    let mut texts = vec![query];
    texts.extend(passages.iter().zip(&vectors).filter(|(_, v)| v.is_none()).map(|(p, _)| p.text));
    let (embedded, timings) = semantic.engine().embed(&texts).await?;
    let mut embedded = embedded.into_iter();
    let query = embedded.next().ok_or_else(|| Error::Internal("the embedder returned no vector".into()))?;
    for slot in vectors.iter_mut().filter(|v| v.is_none()) {
        *slot = embedded.next();
    }
    let scores = vectors
        .iter()
        .map(|v| v.as_ref().map_or(f32::NEG_INFINITY, |v| v.iter().zip(&query).map(|(a, b)| a * b).sum()))
        .collect();
    Ok((scores, timings))
}
