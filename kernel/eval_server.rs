//! The loopback server evaluations score through: an [`Evaluator`] that
//! starts the real server on 127.0.0.1:0 with the models under test over a
//! scratch data dir, and hands its channel to the plain-client scorer in
//! `eval::retrieval`. The scratch dir is per data set and per embedding
//! model (`{data_dir}/eval/{set}/{embedder key}`), so the knowledge base's
//! vectors for each model stay on disk between runs and a gate comparing
//! two retrievers embeds each knowledge base once, not once per comparison.
//! Living here, outside `eval` and `registry`, keeps both free of the
//! server they are clients of.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use crate::{
    config::Config,
    error::{Error, Result},
    eval::{
        dataset,
        retrieval::{self, EvalKnowledge, EvalSet, Evaluator, ModelChoice, RetrievalReport},
    },
    kb::{self, KnowledgeStore},
    proto::KnowledgeFilter,
    tenancy::DEFAULT_TENANT,
};

/// Scratch dirs kept per evaluation set: one per embedding model recently
/// scored on it (a round's serving model and its candidate, and a few before).
const KEEP_PER_SET: usize = 4;

/// Evaluations on an in-process server built from `config`.
pub struct LoopbackEvaluator {
    pub config: Config,
}

impl LoopbackEvaluator {
    pub fn new(config: &Config) -> Self {
        LoopbackEvaluator { config: config.clone() }
    }

    /// The models `config` names.
    pub fn configured(&self) -> ModelChoice {
        ModelChoice { embedder: self.config.models.embedder.clone(), ranker: self.config.models.ranker.clone() }
    }
}

#[tonic::async_trait]
impl Evaluator for LoopbackEvaluator {
    async fn evaluate(
        &self,
        models: &ModelChoice,
        set: &EvalSet<'_>,
        context_turns: usize,
        rank: bool,
    ) -> Result<RetrievalReport> {
        let config = &self.config;
        let mut eval_config = config.clone();
        eval_config.models.embedder.clone_from(&models.embedder);
        eval_config.models.ranker.clone_from(&models.ranker);
        let set_dir = config.data_dir.join("eval").join(set.name);
        eval_config.data_dir = set_dir.join(embedder_key(&models.embedder));
        eval_config.models.cache_dir = config.model_cache();
        // Retrieval and ranking need no decoder.
        eval_config.models.generator = "none".into();
        eval_config.listen = "127.0.0.1:0".parse().expect("literal address");
        eval_config.retrieve.context_turns = context_turns;
        if eval_config.embedder_dir()?.is_none() {
            return Err(Error::InvalidArgument(
                "retrieval evaluation needs an embedding model (models.embedder)".into(),
            ));
        }
        prepare_knowledge(&eval_config, &set.knowledge)?;
        prune(&set_dir, &eval_config.data_dir);
        let server = crate::server::start(eval_config).await?;
        // Its own loopback server: no keys configured, so none to present.
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .map_err(|e| Error::Internal(e.to_string()))?
            .connect()
            .await
            .map_err(|e| Error::Unavailable(format!("eval server: {e}")))?;
        let channel = crate::remote::Remote::new(channel, crate::remote::ApiKey::default());
        let report = retrieval::score(channel, set, context_turns, rank).await;
        server.shutdown().await?;
        report
    }
}

/// `{name}-{12 hex digits of the choice's hash}`: stable for one model
/// choice, readable in a listing.
fn embedder_key(embedder: &str) -> String {
    let name: String = Path::new(embedder)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
        .take(48)
        .collect();
    let digest = Sha256::digest(embedder.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{name}-{hex}")
}

/// Removes the set's scratch dirs beyond the [`KEEP_PER_SET`] most recently
/// used (`current` among them). Best effort: a dir that cannot be removed
/// only takes disk.
fn prune(set_dir: &Path, current: &Path) {
    // A stamp written now marks `current` as the most recently used.
    let _ = std::fs::write(current.join(".last-used"), b"");
    let Ok(entries) = std::fs::read_dir(set_dir) else { return };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    for (_, dir) in dirs.into_iter().skip(KEEP_PER_SET) {
        if dir != current {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// The knowledge in the scratch knowledge base (objects it no longer has
/// deleted), with vectors.
fn prepare_knowledge(config: &Config, knowledge: &EvalKnowledge) -> Result<()> {
    let objects = match knowledge {
        EvalKnowledge::Dataset(dir) => dataset::read_corpus_of(dir)?,
        EvalKnowledge::Objects(objects) => objects.iter().filter(|o| !o.deleted).cloned().collect(),
    };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error::Internal(format!("{}: {e}", config.data_dir.display())))?;
    let store = KnowledgeStore::open(&config.knowledge_path())?;
    for chunk in objects.chunks(crate::api::convert::MAX_ITEMS) {
        store.upsert_batch(DEFAULT_TENANT, chunk.to_vec())?;
    }
    let wanted: HashSet<&str> = objects.iter().map(|o| o.id.as_str()).collect();
    for id in all_ids(&store)? {
        if !wanted.contains(id.as_str()) {
            store.delete(DEFAULT_TENANT, &id)?;
        }
    }
    if let Some(dir) = config.embedder_dir()? {
        let mut last = 0;
        let (embedded, _) = kb::semantic::embed_stale(
            &config.device()?,
            &store,
            &dir,
            config.models.embed_token_budget,
            |done, total| {
                if done * 10 / total.max(1) != last * 10 / total.max(1) {
                    eprintln!("embedding knowledge: {done}/{total}");
                }
                last = done;
            },
        )?;
        if embedded > 0 {
            eprintln!("embedded {embedded} knowledge objects");
        }
    }
    Ok(())
}

/// Ids of every live object of `store` (evaluation data is the default tenant's).
fn all_ids(store: &KnowledgeStore) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list(DEFAULT_TENANT, after.as_deref(), 1_000, &KnowledgeFilter::default(), false)?;
        ids.extend(page.objects.into_iter().map(|o| o.id));
        match page.next_after {
            Some(next) => after = Some(next),
            None => return Ok(ids),
        }
    }
}
