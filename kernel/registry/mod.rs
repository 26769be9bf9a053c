//! The model registry: which version serves each role, which one is the
//! challenger beside it, and the earlier serving versions that rollback walks
//! back through. One JSON file in the data dir, replaced atomically; the
//! server follows it (`serving::follow`), so a promotion reaches the agents
//! without a redeploy.
//!
//! A version is the name of a trained folder under `{data_dir}/trained/`
//! (what `aitl worker train-*` writes) or the path of any model folder or
//! file. "No version" means the model the config names.

pub mod gate;
pub mod manifest;

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use self::manifest::TrainedManifest;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Retriever,
    Ranker,
    Generator,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Retriever, Role::Ranker, Role::Generator];

    pub fn name(self) -> &'static str {
        match self {
            Role::Retriever => "retriever",
            Role::Ranker => "ranker",
            Role::Generator => "generator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoleState {
    /// The promoted version; None serves the configured model.
    pub serving: Option<String>,
    /// What served before each promotion, the latest last.
    pub previous: Vec<Option<String>>,
    /// A version evaluated beside the serving one (for the generator: half of
    /// the candidates of `challenger_share` of Generate requests).
    pub challenger: Option<String>,
}

/// One change, kept for the audit trail `aitl models list` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEvent {
    pub at_ms: i64,
    pub role: Role,
    /// "promote", "rollback" or "challenger".
    pub action: String,
    pub version: Option<String>,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Registry {
    pub retriever: RoleState,
    pub ranker: RoleState,
    pub generator: RoleState,
    /// Share of Generate requests (two or more candidates) split between the
    /// generator's champion and challenger.
    pub challenger_share: f64,
    pub events: Vec<RegistryEvent>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            retriever: RoleState::default(),
            ranker: RoleState::default(),
            generator: RoleState::default(),
            challenger_share: 0.2,
            events: Vec::new(),
        }
    }
}

pub const FILE: &str = "registry.json";

pub fn trained_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("trained")
}

/// Where a version's model lives: a folder under `trained/`, else the path it names.
pub fn resolve(data_dir: &Path, version: &str) -> PathBuf {
    let trained = trained_dir(data_dir).join(version);
    if !version.contains(['/', '\\']) && trained.exists() { trained } else { PathBuf::from(version) }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Registry {
    /// The registry of `data_dir`; empty (everything configured) when there is none yet.
    pub fn load(data_dir: &Path) -> Result<Registry> {
        Registry::read(data_dir).map(|(registry, _)| registry)
    }

    /// The registry and the bytes it was parsed from (None: no file), so a
    /// follower can tell a later change from the state it started with.
    pub fn read(data_dir: &Path) -> Result<(Registry, Option<Vec<u8>>)> {
        let path = data_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => match Registry::parse(&bytes) {
                Ok(registry) => Ok((registry, Some(bytes))),
                Err(e) => Err(Error::InvalidArgument(format!("{}: {e}", path.display()))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Registry::default(), None)),
            Err(e) => Err(Error::Internal(format!("{}: {e}", path.display()))),
        }
    }

    pub fn parse(bytes: &[u8]) -> std::result::Result<Registry, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Writes the registry whole: a reader (the server) sees the old file or
    /// the new one, never a mix, and a crash after this returns keeps it.
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        let fail = |e: std::io::Error| Error::Internal(format!("{}: {e}", data_dir.join(FILE).display()));
        std::fs::create_dir_all(data_dir).map_err(fail)?;
        let partial = data_dir.join(format!(".{FILE}.partial"));
        let mut file = std::fs::File::create(&partial).map_err(fail)?;
        file.write_all(&serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(e.to_string()))?).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&partial, data_dir.join(FILE)).map_err(fail)?;
        std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(fail)
    }

    /// `config` with each promoted version in place of the configured model.
    pub fn serving_config(&self, config: &crate::config::Config) -> crate::config::Config {
        let mut config = config.clone();
        for role in Role::ALL {
            let Some(version) = &self.role(role).serving else { continue };
            let path = resolve(&config.data_dir, version).to_string_lossy().into_owned();
            match role {
                Role::Retriever => config.models.embedder = path,
                Role::Ranker => config.models.ranker = path,
                Role::Generator => config.models.generator = path,
            }
        }
        config
    }

    /// The retriever and ranker serving now, as the gate evaluates them.
    pub fn serving_choice(&self, config: &crate::config::Config) -> gate::ModelChoice {
        let serving = self.serving_config(config);
        gate::ModelChoice { embedder: serving.models.embedder, ranker: serving.models.ranker }
    }

    pub fn role(&self, role: Role) -> &RoleState {
        match role {
            Role::Retriever => &self.retriever,
            Role::Ranker => &self.ranker,
            Role::Generator => &self.generator,
        }
    }

    fn role_mut(&mut self, role: Role) -> &mut RoleState {
        match role {
            Role::Retriever => &mut self.retriever,
            Role::Ranker => &mut self.ranker,
            Role::Generator => &mut self.generator,
        }
    }

    fn record(&mut self, role: Role, action: &str, version: Option<String>, note: String) {
        self.events.push(RegistryEvent { at_ms: now_ms(), role, action: action.into(), version, note });
    }

    /// Makes `version` serve; a challenger that is promoted stops being one.
    pub fn promote(&mut self, role: Role, version: &str, note: String) {
        let state = self.role_mut(role);
        let before = state.serving.replace(version.to_string());
        state.previous.push(before);
        if state.challenger.as_deref() == Some(version) {
            state.challenger = None;
        }
        self.record(role, "promote", Some(version.to_string()), note);
    }

    /// Puts back what served before the last promotion; returns it (None:
    /// the configured model).
    pub fn rollback(&mut self, role: Role) -> Result<Option<String>> {
        let state = self.role_mut(role);
        let Some(before) = state.previous.pop() else {
            return Err(Error::FailedPrecondition(format!(
                "the {role} has no earlier version to roll back to (it serves {})",
                state.serving.as_deref().unwrap_or("the configured model")
            )));
        };
        let rolled_back = std::mem::replace(&mut state.serving, before.clone());
        self.record(role, "rollback", before.clone(), format!("rolled back from {}", rolled_back.unwrap_or_default()));
        Ok(before)
    }

    pub fn set_challenger(&mut self, role: Role, version: Option<String>, share: Option<f64>) -> Result<()> {
        if let Some(share) = share {
            if !(0.0..=1.0).contains(&share) {
                return Err(Error::InvalidArgument(format!("challenger share {share} is outside 0 to 1")));
            }
            self.challenger_share = share;
        }
        self.role_mut(role).challenger.clone_from(&version);
        let note = format!("share {}", self.challenger_share);
        self.record(role, "challenger", version, note);
        Ok(())
    }
}

/// Trained versions under `{data_dir}/trained/`, oldest first, with their manifests.
pub fn trained_versions(data_dir: &Path) -> Result<Vec<(String, TrainedManifest)>> {
    let dir = trained_dir(data_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Internal(format!("{}: {e}", dir.display()))),
    };
    let mut versions = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(manifest) = TrainedManifest::read(&entry.path())? {
            versions.push((name, manifest));
        }
    }
    versions.sort_by(|a, b| (a.1.created_ms, &a.0).cmp(&(b.1.created_ms, &b.0)));
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promote_and_rollback_walk_the_history_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::load(dir.path()).unwrap();
        assert_eq!(registry.retriever.serving, None);
        registry.set_challenger(Role::Retriever, Some("retriever-b".into()), Some(0.5)).unwrap();
        registry.promote(Role::Retriever, "retriever-a", "first".into());
        registry.promote(Role::Retriever, "retriever-b", "second".into());
        assert_eq!(registry.retriever.challenger, None, "a promoted challenger stops being one");
        registry.save(dir.path()).unwrap();

        let mut registry = Registry::load(dir.path()).unwrap();
        assert_eq!(registry.retriever.serving.as_deref(), Some("retriever-b"));
        assert_eq!(registry.rollback(Role::Retriever).unwrap().as_deref(), Some("retriever-a"));
        assert_eq!(registry.rollback(Role::Retriever).unwrap(), None);
        let err = registry.rollback(Role::Retriever).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert_eq!(registry.ranker, RoleState::default());
        assert!(registry.set_challenger(Role::Generator, None, Some(1.5)).is_err());
        let actions: Vec<&str> = registry.events.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["challenger", "promote", "promote", "rollback", "rollback"]);
    }
}
