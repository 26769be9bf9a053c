//! Semantic retrieval over the knowledge base: the embedding engine, the
//! vector index and the store kept in step. Vectors are stored beside their
//! objects, tagged with the model version, so a restart loads them instead of
//! re-embedding; objects without a current vector are embedded at start.

use std::{sync::Arc, time::Instant};

use super::{
    KnowledgeStore,
    device_index::DeviceIndex,
    index::{ExactIndex, Hit, IndexEntry, Query, VectorIndex},
    scan::SharedScan,
};
use crate::{
    backend::{Device, cuda::search::VectorPrecision},
    engine::{EmbeddingEngine, EncodeTimings},
    error::{Error, Result},
    proto::{ConversationTurn, KnowledgeFilter, KnowledgeObject},
};

/// How a Retrieve request becomes the text that is embedded.
#[derive(Debug, Clone, Copy)]
pub struct QueryComposition {
    /// How many conversation turns before the question are prepended.
    pub context_turns: usize,
}

impl QueryComposition {
    /// The last `context_turns` turns and the question, joined with spaces
    /// (the conversation usually names the entity the question is about).
    pub fn compose(&self, query: &str, context: &[ConversationTurn]) -> String {
        let skip = context.len().saturating_sub(self.context_turns);
        let mut parts: Vec<&str> = context[skip..].iter().map(|t| t.text.trim()).collect();
        parts.push(query.trim());
        parts.join(" ")
    }
}

/// Objects embedded per engine call while indexing.
const INDEX_CHUNK: usize = 256;

pub struct SemanticIndex {
    engine: EmbeddingEngine,
    index: Arc<dyn VectorIndex>,
    /// Concurrent searches share scans of `index`.
    scan: SharedScan,
    kb: Arc<KnowledgeStore>,
}

impl SemanticIndex {
    /// Loads stored vectors of the engine's model and embeds what is missing.
    /// On a GPU the index's vectors live there too, kept in `precision`.
    pub async fn open(engine: EmbeddingEngine, kb: Arc<KnowledgeStore>, precision: VectorPrecision) -> Result<Self> {
        let started = Instant::now();
        let version = engine.version().to_string();
        let objects = {
            let kb = kb.clone();
            let version = version.clone();
            tokio::task::spawn_blocking(move || kb.objects_with_vectors(&version))
                .await
                .map_err(|e| Error::Internal(format!("loading vectors: {e}")))??
        };
        let index: Arc<dyn VectorIndex> = match engine.device() {
            Device::Cpu => Arc::new(ExactIndex::new(engine.dimension(), version)),
            Device::Cuda(gpu) => Arc::new(DeviceIndex::new(gpu.clone(), engine.dimension(), version, precision)?),
        };
        let mut stale = Vec::new();
        for (object, vector) in objects {
            match vector {
                Some(vector) if vector.len() == engine.dimension() => index.upsert(IndexEntry::of(&object), &vector),
                _ => stale.push(object),
            }
        }
        let loaded = index.len();
        let this = SemanticIndex { engine, scan: SharedScan::new(index.clone()), index, kb };
        if !stale.is_empty() {
            tracing::info!(objects = stale.len(), "embedding knowledge objects without a current vector");
        }
        this.index_objects(&stale).await?;
        tracing::info!(loaded, embedded = stale.len(), elapsed = ?started.elapsed(), "vector index ready");
        Ok(this)
    }

    pub fn model_version(&self) -> &str {
        self.engine.version()
    }

    pub fn engine(&self) -> &EmbeddingEngine {
        &self.engine
    }

    /// The indexed vector of exactly this version of an object, if any.
    pub fn stored_vector(&self, id: &str, version: u64) -> Option<Vec<f32>> {
        self.index.vector(id, version)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Embeds objects, stores their vectors, and makes them searchable.
    pub async fn index_objects(&self, objects: &[KnowledgeObject]) -> Result<()> {
        for (i, chunk) in objects.chunks(INDEX_CHUNK).enumerate() {
            let texts: Vec<&str> = chunk.iter().map(|o| o.text.as_str()).collect();
            let (vectors, _) = self.engine.embed(&texts).await?;
            let entries: Vec<(String, u64, Vec<f32>)> =
                chunk.iter().zip(&vectors).map(|(o, v)| (o.id.clone(), o.version, v.clone())).collect();
            let kb = self.kb.clone();
            let version = self.engine.version().to_string();
            tokio::task::spawn_blocking(move || kb.put_vectors(&version, &entries))
                .await
                .map_err(|e| Error::Internal(format!("storing vectors: {e}")))??;
            for (object, vector) in chunk.iter().zip(&vectors) {
                self.index.upsert(IndexEntry::of(object), vector);
            }
            if objects.len() > INDEX_CHUNK {
                let done = ((i + 1) * INDEX_CHUNK).min(objects.len());
                tracing::info!(done, total = objects.len(), "embedding knowledge");
            }
        }
        Ok(())
    }

    /// Brings the index in step with the store after it was filled while
    /// the store kept changing: embeds objects written since, drops deleted
    /// ones. Returns how many objects it embedded. The caller holds writes
    /// to the store off while this runs.
    pub async fn catch_up(&self) -> Result<usize> {
        let version = self.engine.version().to_string();
        let objects = {
            let kb = self.kb.clone();
            tokio::task::spawn_blocking(move || kb.objects_with_vectors(&version))
                .await
                .map_err(|e| Error::Internal(format!("loading vectors: {e}")))??
        };
        let live: std::collections::HashMap<&str, u64> =
            objects.iter().map(|(o, _)| (o.id.as_str(), o.version)).collect();
        for (id, version) in self.index.entries() {
            if live.get(id.as_str()) != Some(&version) {
                self.index.remove(&id);
            }
        }
        let mut stale = Vec::new();
        for (object, vector) in &objects {
            if self.index.vector(&object.id, object.version).is_some() {
                continue;
            }
            match vector {
                Some(vector) if vector.len() == self.engine.dimension() => {
                    self.index.upsert(IndexEntry::of(object), vector)
                }
                _ => stale.push(object.clone()),
            }
        }
        self.index_objects(&stale).await?;
        Ok(stale.len())
    }

    pub fn remove(&self, id: &str) {
        self.index.remove(id);
    }

    /// Embeds `text` and returns the `k` nearest objects.
    pub async fn search(&self, text: &str, k: usize, filter: &KnowledgeFilter) -> Result<(Vec<Hit>, EncodeTimings)> {
        let (mut vectors, timings) = self.engine.embed(&[text]).await?;
        let query = vectors.pop().ok_or_else(|| Error::Internal("the embedder returned no vector".into()))?;
        let hits = self.scan.search(Query { vector: query, k, filter: filter.clone() }).await?;
        Ok((hits, timings))
    }
}

/// Embeds, on this thread, every live object of `store` without a current
/// vector from the model in `model_dir` (bulk ingestion, outside a server).
/// Reports progress as (done, total); returns the count and model version.
pub fn embed_stale(
    device: &Device,
    store: &KnowledgeStore,
    model_dir: &std::path::Path,
    token_budget: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<(usize, String)> {
    let embedder = crate::model::sentence::SentenceEmbedder::load(device, model_dir)?;
    let version = embedder.version().to_string();
    let stale: Vec<KnowledgeObject> =
        store.objects_with_vectors(&version)?.into_iter().filter(|(_, v)| v.is_none()).map(|(o, _)| o).collect();
    for (i, chunk) in stale.chunks(INDEX_CHUNK).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|o| o.text.as_str()).collect();
        let vectors = embedder.embed(device, &texts, token_budget)?;
        let entries: Vec<_> = chunk.iter().zip(vectors).map(|(o, v)| (o.id.clone(), o.version, v)).collect();
        store.put_vectors(&version, &entries)?;
        progress(((i + 1) * INDEX_CHUNK).min(stale.len()), stale.len());
    }
    Ok((stale.len(), version))
}
