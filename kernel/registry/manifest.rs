//! `aitl_manifest.json`, written into every trained folder: where the model
//! came from (parent, training set, hyperparameters), how training went, and
//! how it and its parent score on the training set's held-out queries.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Role;
use crate::{
    error::{Error, Result},
    eval::metrics::RankingMetrics,
};

pub const FILE: &str = "aitl_manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainedManifest {
    #[serde(alias = "kind")]
    pub role: Role,
    /// The served model version, `{folder}@{weights digest}`.
    pub version: String,
    pub parent: String,
    pub training_set: String,
    pub training_set_dir: PathBuf,
    pub examples: usize,
    pub hyperparameters: serde_json::Value,
    pub steps: usize,
    #[serde(default)]
    pub resumed_at: usize,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub seconds: f64,
    /// What trained it: "cpu" or "cuda:N".
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub created_ms: i64,
    #[serde(default)]
    pub heldout: Option<HeldoutEvaluation>,
}

/// Quality on the training set's held-out queries (agents' labels), beside
/// the parent's on the same queries and knowledge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldoutEvaluation {
    /// "recall@75" (retriever), or for a ranker (after ranking the retrieved top 75) "precision@8" on
    /// complete labels and "ndcg@10 over judged objects" on agents' labels.
    pub metric: String,
    pub value: f64,
    pub parent_value: f64,
    pub model: RankingMetrics,
    pub parent: RankingMetrics,
}

impl TrainedManifest {
    /// The manifest of a trained folder; None for a folder without one.
    pub fn read(dir: &Path) -> Result<Option<TrainedManifest>> {
        crate::model::hf_folder::read_json(&dir.join(FILE))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(dir.join(FILE), text).map_err(|e| Error::Internal(format!("{}: {e}", dir.display())))
    }
}
