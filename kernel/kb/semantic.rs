//! Semantic retrieval over the knowledge base: the embedding engine, the
//! vector index and the store kept in step. Vectors are stored beside their
//! objects, tagged with the model version, so a restart loads them instead of
//! re-embedding; objects without a current vector are embedded at start.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Instant,
};

use super::{
    KnowledgeStore, StoredObject,
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

/// One tenant's vectors: searches never cross tenants, so each has its own
/// index and its own shared scan, and its top k are its own.
struct TenantIndex {
    index: Arc<dyn VectorIndex>,
    /// Concurrent searches share scans of `index`.
    scan: SharedScan,
}

pub struct SemanticIndex {
    engine: EmbeddingEngine,
    precision: VectorPrecision,
    tenants: RwLock<HashMap<String, Arc<TenantIndex>>>,
    kb: Arc<KnowledgeStore>,
}

impl SemanticIndex {
    /// Loads stored vectors of the engine's model and embeds what is missing.
    /// On a GPU the index's vectors live there too, kept in `precision`.
    pub async fn open(engine: EmbeddingEngine, kb: Arc<KnowledgeStore>, precision: VectorPrecision) -> Result<Self> {
        let started = Instant::now();
        let this = SemanticIndex { engine, precision, tenants: RwLock::default(), kb };
        let objects = this.load_objects().await?;
        let mut stale: HashMap<String, Vec<KnowledgeObject>> = HashMap::new();
        let mut loaded = 0;
        for stored in objects {
            match stored.vector {
                Some(vector) if vector.len() == this.engine.dimension() => {
                    this.tenant(&stored.tenant)?.index.upsert(IndexEntry::of(&stored.object), &vector);
                    loaded += 1;
                }
                _ => stale.entry(stored.tenant).or_default().push(stored.object),
            }
        }
        let embedded: usize = stale.values().map(Vec::len).sum();
        if embedded > 0 {
            tracing::info!(objects = embedded, "embedding knowledge objects without a current vector");
        }
        for (tenant, objects) in &stale {
            this.index_objects(tenant, objects).await?;
        }
        tracing::info!(loaded, embedded, elapsed = ?started.elapsed(), "vector index ready");
        Ok(this)
    }

    async fn load_objects(&self) -> Result<Vec<StoredObject>> {
        let kb = self.kb.clone();
        let version = self.engine.version().to_string();
        tokio::task::spawn_blocking(move || kb.objects_with_vectors(&version))
            .await
            .map_err(|e| Error::Internal(format!("loading vectors: {e}")))?
            .map_err(Error::from)
    }

    /// A tenant's index, made empty on its first object.
    fn tenant(&self, tenant: &str) -> Result<Arc<TenantIndex>> {
        if let Some(found) = self.find(tenant) {
            return Ok(found);
        }
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = tenants.get(tenant) {
            return Ok(found.clone());
        }
        let (dimension, version) = (self.engine.dimension(), self.engine.version().to_string());
        let index: Arc<dyn VectorIndex> = match self.engine.device() {
            Device::Cpu => Arc::new(ExactIndex::new(dimension, version)),
            Device::Cuda(gpu) => Arc::new(DeviceIndex::new(gpu.clone(), dimension, version, self.precision)?),
        };
        let made = Arc::new(TenantIndex { scan: SharedScan::new(index.clone()), index });
        tenants.insert(tenant.to_string(), made.clone());
        Ok(made)
    }

    fn find(&self, tenant: &str) -> Option<Arc<TenantIndex>> {
        self.tenants.read().unwrap_or_else(|e| e.into_inner()).get(tenant).cloned()
    }

    fn all(&self) -> Vec<Arc<TenantIndex>> {
        self.tenants.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn model_version(&self) -> &str {
        self.engine.version()
    }

    pub fn engine(&self) -> &EmbeddingEngine {
        &self.engine
    }

    /// The indexed vector of exactly this version of a tenant's object, if any.
    pub fn stored_vector(&self, tenant: &str, id: &str, version: u64) -> Option<Vec<f32>> {
        self.find(tenant)?.index.vector(id, version)
    }

    /// Indexed objects, all tenants together.
    pub fn len(&self) -> usize {
        self.all().iter().map(|t| t.index.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Embeds a tenant's objects, stores their vectors, and makes them
    /// searchable.
    pub async fn index_objects(&self, tenant: &str, objects: &[KnowledgeObject]) -> Result<()> {
        if objects.is_empty() {
            return Ok(());
        }
        let target = self.tenant(tenant)?;
        for (i, chunk) in objects.chunks(INDEX_CHUNK).enumerate() {
            let texts: Vec<&str> = chunk.iter().map(|o| o.text.as_str()).collect();
            let (vectors, _) = self.engine.embed(&texts).await?;
            let entries: Vec<(String, u64, Vec<f32>)> =
                chunk.iter().zip(&vectors).map(|(o, v)| (o.id.clone(), o.version, v.clone())).collect();
            let kb = self.kb.clone();
            let version = self.engine.version().to_string();
            let owner = tenant.to_string();
            tokio::task::spawn_blocking(move || kb.put_vectors(&version, &owner, &entries))
                .await
                .map_err(|e| Error::Internal(format!("storing vectors: {e}")))??;
            for (object, vector) in chunk.iter().zip(&vectors) {
                target.index.upsert(IndexEntry::of(object), vector);
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
        let objects = self.load_objects().await?;
        let mut live: HashMap<&str, HashMap<&str, u64>> = HashMap::new();
        for stored in &objects {
            live.entry(stored.tenant.as_str()).or_default().insert(stored.object.id.as_str(), stored.object.version);
        }
        let tenants: Vec<(String, Arc<TenantIndex>)> = self
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(t, i)| (t.clone(), i.clone()))
            .collect();
        for (tenant, target) in tenants {
            let live = live.get(tenant.as_str());
            for (id, version) in target.index.entries() {
                if live.and_then(|ids| ids.get(id.as_str())) != Some(&version) {
                    target.index.remove(&id);
                }
            }
        }
        let mut stale: HashMap<&str, Vec<KnowledgeObject>> = HashMap::new();
        for stored in &objects {
            let target = self.tenant(&stored.tenant)?;
            if target.index.vector(&stored.object.id, stored.object.version).is_some() {
                continue;
            }
            match &stored.vector {
                Some(vector) if vector.len() == self.engine.dimension() => {
                    target.index.upsert(IndexEntry::of(&stored.object), vector)
                }
                _ => stale.entry(stored.tenant.as_str()).or_default().push(stored.object.clone()),
            }
        }
        let mut embedded = 0;
        for (tenant, objects) in &stale {
            self.index_objects(tenant, objects).await?;
            embedded += objects.len();
        }
        Ok(embedded)
    }

    pub fn remove(&self, tenant: &str, id: &str) {
        if let Some(target) = self.find(tenant) {
            target.index.remove(id);
        }
    }

    /// Embeds `text` and returns the tenant's `k` nearest objects.
    pub async fn search(
        &self,
        tenant: &str,
        text: &str,
        k: usize,
        filter: &KnowledgeFilter,
    ) -> Result<(Vec<Hit>, EncodeTimings)> {
        // A tenant with no knowledge yet has nothing to search: no need to embed.
        let Some(target) = self.find(tenant) else { return Ok((Vec::new(), EncodeTimings::default())) };
        let (mut vectors, timings) = self.engine.embed(&[text]).await?;
        let query = vectors.pop().ok_or_else(|| Error::Internal("the embedder returned no vector".into()))?;
        let hits = target.scan.search(Query { vector: query, k, filter: filter.clone() }).await?;
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
    let stale: Vec<StoredObject> =
        store.objects_with_vectors(&version)?.into_iter().filter(|stored| stored.vector.is_none()).collect();
    for (i, chunk) in stale.chunks(INDEX_CHUNK).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|s| s.object.text.as_str()).collect();
        let vectors = embedder.embed(device, &texts, token_budget)?;
        let mut by_tenant: HashMap<&str, Vec<(String, u64, Vec<f32>)>> = HashMap::new();
        for (stored, vector) in chunk.iter().zip(vectors) {
            let entry = (stored.object.id.clone(), stored.object.version, vector);
            by_tenant.entry(stored.tenant.as_str()).or_default().push(entry);
        }
        for (tenant, entries) in by_tenant {
            store.put_vectors(&version, tenant, &entries)?;
        }
        progress(((i + 1) * INDEX_CHUNK).min(stale.len()), stale.len());
    }
    Ok((stale.len(), version))
}
