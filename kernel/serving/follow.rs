//! Follows the registry file: when it changes, loads what it names and swaps
//! it in while the old model keeps serving.
//!
//! - ranker: loaded, then swapped in one step;
//! - retriever: loaded, then every knowledge object is embedded with it in
//!   the background (vectors are stored per model, so this is done once per
//!   version); then, with knowledge writes held off for the moment it takes
//!   to embed what changed meanwhile, the new query encoder and its index
//!   replace the old pair together (with the similarity ranker, which reads
//!   the same vectors);
//! - generator: the champion, and the challenger with its share of traffic.
//!
//! A model that fails to load leaves the old one serving; the reason is in
//! the log and in `FlywheelService/GetServingModels`.

use std::{path::Path, sync::Arc, time::Duration};

use super::{Generators, load};
use crate::{
    api::AppState,
    config::Config,
    engine::Ranker,
    error::Result,
    kb::SemanticIndex,
    registry::{self, Registry, Role},
};

/// What each role should serve, as config values (a path, "default",
/// "similarity", "none").
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    pub retriever: String,
    pub ranker: String,
    pub generator: String,
    pub challenger: Option<String>,
    pub challenger_share: f64,
}

impl Targets {
    pub fn of(config: &Config, registry: &Registry) -> Targets {
        let serving = registry.serving_config(config);
        Targets {
            retriever: serving.models.embedder,
            ranker: serving.models.ranker,
            generator: serving.models.generator,
            challenger: registry
                .generator
                .challenger
                .as_ref()
                .map(|v| registry::resolve(&config.data_dir, v).to_string_lossy().into_owned()),
            challenger_share: registry.challenger_share,
        }
    }
}

pub struct Follower {
    state: Arc<AppState>,
    /// The configuration before the registry is applied.
    config: Config,
    /// What serves now.
    serving: Targets,
    /// Registry bytes last applied.
    seen: Option<Vec<u8>>,
}

fn read_registry(data_dir: &Path) -> Option<Vec<u8>> {
    std::fs::read(data_dir.join(registry::FILE)).ok()
}

impl Follower {
    /// `seen`: the registry bytes the server loaded its models from.
    pub fn new(state: Arc<AppState>, config: Config, serving: Targets, seen: Option<Vec<u8>>) -> Self {
        Follower { state, config, serving, seen }
    }

    /// Polls the registry every `interval` until the task is aborted.
    pub fn spawn(mut self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                self.poll().await;
            }
        })
    }

    /// Applies the registry if it changed since the last look.
    pub async fn poll(&mut self) {
        let bytes = read_registry(&self.config.data_dir);
        if bytes == self.seen {
            return;
        }
        self.seen.clone_from(&bytes);
        let registry = match bytes.as_deref().map(Registry::parse).transpose() {
            Ok(registry) => registry.unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %e, "registry.json is unreadable; the serving models stay");
                return;
            }
        };
        self.apply(&registry).await;
    }

    async fn apply(&mut self, registry: &Registry) {
        let want = Targets::of(&self.config, registry);
        for role in [Role::Retriever, Role::Ranker] {
            let challenger = registry.role(role).challenger.clone();
            self.state.serving.update(role, |s| s.challenger = challenger);
        }
        if want.retriever != self.serving.retriever {
            let version = registry.retriever.serving.clone();
            self.swap_retriever(&want.retriever, version).await;
        }
        if want.ranker != self.serving.ranker {
            let version = registry.ranker.serving.clone();
            self.swap_ranker(&want.ranker, version).await;
        }
        if want.generator != self.serving.generator
            || want.challenger != self.serving.challenger
            || want.challenger_share != self.serving.challenger_share
        {
            self.swap_generators(&want, registry).await;
        }
    }

    fn failed(&self, role: Role, target: &str, e: impl std::fmt::Display) {
        let why = format!("cannot switch the {role} to {target}: {e}; the previous model keeps serving");
        tracing::error!("{why}");
        self.state.serving.update(role, |s| {
            s.switching_to = None;
            s.last_error = Some(why);
        });
    }

    fn served(&self, role: Role, version: String, registry_version: Option<String>, source: &str) {
        tracing::info!(%role, %version, source, "now serving");
        self.state.serving.update(role, |s| {
            s.version = version;
            s.registry_version = registry_version;
            s.source = source.into();
            s.switching_to = None;
            s.last_error = None;
        });
    }

    async fn swap_retriever(&mut self, target: &str, registry_version: Option<String>) {
        self.state.serving.update(Role::Retriever, |s| s.switching_to = Some(target.into()));
        let similarity_ranker = self.serving.ranker == "similarity";
        match self.switch_retriever(target, similarity_ranker).await {
            Ok(version) => {
                self.serving.retriever = target.into();
                if similarity_ranker {
                    let ranker_version = self.state.ranker.get().map(|r| r.version().to_string()).unwrap_or_default();
                    self.state.serving.update(Role::Ranker, |s| s.version = ranker_version);
                }
                self.served(Role::Retriever, version, registry_version, target);
            }
            Err(e) => self.failed(Role::Retriever, target, e),
        }
    }

    async fn switch_retriever(&self, target: &str, similarity_ranker: bool) -> Result<String> {
        let state = &self.state;
        let mut config = self.config.clone();
        config.models.embedder = target.into();
        let index = match load::embedder(&config).await? {
            Some(engine) => {
                Some(Arc::new(SemanticIndex::open(engine, state.kb.clone(), config.retrieve.vector_precision).await?))
            }
            None => None,
        };
        let writes = state.knowledge_writes.write().await;
        if let Some(index) = &index {
            let embedded = index.catch_up().await?;
            tracing::debug!(embedded, "knowledge written during the re-embedding");
        }
        let old = state.semantic.set(index.clone());
        if similarity_ranker {
            state.ranker.swap(index.clone().map(Ranker::similarity));
        }
        drop(writes);
        // The previous model's vectors stay for a rollback; older ones go.
        let keep: Vec<String> = [&index, &old].into_iter().flatten().map(|i| i.model_version().to_string()).collect();
        let kb = state.kb.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            kb.retain_vector_models(&keep.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await;
        if let Ok(Err(e)) = pruned {
            tracing::warn!(error = %e, "could not drop old models' vectors");
        }
        Ok(index.map(|i| i.model_version().to_string()).unwrap_or_default())
    }

    async fn swap_ranker(&mut self, target: &str, registry_version: Option<String>) {
        self.state.serving.update(Role::Ranker, |s| s.switching_to = Some(target.into()));
        let mut config = self.config.clone();
        config.models.ranker = target.into();
        match load::ranker(&config, self.state.semantic.get().as_ref()).await {
            Ok(ranker) => {
                let version = ranker.as_ref().map(|r| r.version().to_string()).unwrap_or_default();
                self.state.ranker.swap(ranker);
                self.serving.ranker = target.into();
                self.served(Role::Ranker, version, registry_version, target);
            }
            Err(e) => self.failed(Role::Ranker, target, e),
        }
    }

    async fn swap_generators(&mut self, want: &Targets, registry: &Registry) {
        let current = self.state.generators.get();
        let mut champion = current.as_ref().and_then(|g| g.champion.clone());
        let mut challenger = current.as_ref().and_then(|g| g.challenger.clone());
        if want.generator != self.serving.generator {
            self.state.serving.update(Role::Generator, |s| s.switching_to = Some(want.generator.clone()));
            let mut config = self.config.clone();
            config.models.generator.clone_from(&want.generator);
            match load::generator(&config).await {
                Ok(loaded) => {
                    let version = loaded.as_ref().map(|g| g.version().to_string()).unwrap_or_default();
                    champion = loaded;
                    self.serving.generator.clone_from(&want.generator);
                    self.served(Role::Generator, version, registry.generator.serving.clone(), &want.generator);
                }
                Err(e) => self.failed(Role::Generator, &want.generator, e),
            }
        }
        if want.challenger != self.serving.challenger {
            challenger = None;
            if let Some(path) = &want.challenger {
                let mut config = self.config.clone();
                config.models.generator.clone_from(path);
                match load::generator(&config).await {
                    Ok(loaded) => challenger = loaded,
                    Err(e) => self.failed(Role::Generator, &format!("challenger {path}"), e),
                }
            }
            self.serving.challenger.clone_from(&want.challenger);
        }
        self.serving.challenger_share = want.challenger_share;
        let label = challenger.as_ref().map(|g| g.version().to_string());
        self.state.serving.update(Role::Generator, |s| s.challenger = label);
        self.state.generators.swap(Some(Generators { champion, challenger, challenger_share: want.challenger_share }));
    }
}
