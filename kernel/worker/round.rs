//! The model steps of a flywheel round: train a retriever or ranker from
//! the serving one on an export, score it and its parent on the export's
//! held-out queries into its manifest, and promote it through the gate.

use std::path::{Path, PathBuf};

use super::{
    datasets::{self, GeneratorRow, LabelledInteraction, RankerRow, RetrieverPair, RetrieverTriplet},
    generator_gate::{self, GeneratorGateReport},
    train_ranker::{self, RankerTraining},
    train_retriever::{self, RetrieverTraining},
};
use crate::{
    config::Config,
    error::{Error, Result},
    eval::dstc11::LabelledQuery,
    proto::KnowledgeObject,
    registry::{
        self, Registry, Role,
        gate::{self, GateInput, GateReport},
        manifest::TrainedManifest,
    },
};

pub enum Trainer {
    Retriever(RetrieverTraining),
    /// From `base` (a cross-encoder folder), else the serving cross-encoder,
    /// else the serving embedding model's encoder with a new head.
    Ranker(RankerTraining, Option<PathBuf>),
}

impl Trainer {
    pub fn role(&self) -> Role {
        match self {
            Trainer::Retriever(_) => Role::Retriever,
            Trainer::Ranker(..) => Role::Ranker,
        }
    }
}

/// A trained version in the registry's folder.
pub struct Trained {
    pub name: String,
    pub folder: PathBuf,
    pub manifest: TrainedManifest,
}

/// The held-out queries of an export.
pub fn heldout_queries(dataset: &Path) -> Result<Vec<LabelledQuery>> {
    labelled_queries(dataset, "heldout")
}

/// The labelled questions of an export's `split` ("train" or "heldout").
fn labelled_queries(dataset: &Path, split: &str) -> Result<Vec<LabelledQuery>> {
    let rows: Vec<LabelledInteraction> = datasets::read_rows(dataset, split, "queries")?;
    Ok(rows.iter().filter(|q| !q.relevant.is_empty()).map(LabelledInteraction::to_query).collect())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Trains on `dataset` (an `aitl worker export` folder), writes the folder
/// `{data_dir}/trained/{role}-{dataset version}` (or `output`) and its
/// manifest with held-out metrics over `knowledge`.
pub async fn train(
    config: &Config,
    dataset: &Path,
    output: Option<PathBuf>,
    trainer: Trainer,
    knowledge: Vec<KnowledgeObject>,
    progress: impl FnMut(usize, usize, f32) + Send + 'static,
) -> Result<Trained> {
    let role = trainer.role();
    let manifest = datasets::read_manifest(dataset)?;
    let name = format!("{role}-{}", manifest.version);
    let folder = output.unwrap_or_else(|| registry::trained_dir(&config.data_dir).join(&name));
    let name = folder.file_name().map_or(name, |n| n.to_string_lossy().into_owned());
    let registry = Registry::load(&config.data_dir)?;
    let serving = registry.serving_config(config);
    let serving_embedder = || {
        serving.embedder_dir()?.ok_or_else(|| {
            Error::InvalidArgument(format!("{role} training starts from the embedding model; none is configured"))
        })
    };
    let base = match &trainer {
        Trainer::Retriever(_) => serving_embedder()?,
        Trainer::Ranker(_, Some(base)) => base.clone(),
        Trainer::Ranker(_, None) => match serving.ranker() {
            crate::config::RankerChoice::CrossEncoder(dir) => dir,
            _ => serving_embedder()?,
        },
    };
    let (dataset_dir, out, base_dir) = (dataset.to_owned(), folder.clone(), base.clone());
    let (report, examples, hyperparameters) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut progress = progress;
        match trainer {
            Trainer::Retriever(options) => {
                let triplets: Vec<RetrieverTriplet> = datasets::read_rows(&dataset_dir, "train", "retriever")?;
                let pairs: Vec<RetrieverPair> = datasets::read_rows(&dataset_dir, "train", "retriever_pairs")?;
                let report =
                    train_retriever::train_retriever(&base_dir, &triplets, &pairs, &out, &options, &mut progress)?;
                Ok((report, triplets.len() + pairs.len(), serde_json::to_value(&options)))
            }
            Trainer::Ranker(options, _) => {
                let rows: Vec<RankerRow> = datasets::read_rows(&dataset_dir, "train", "ranker")?;
                let report = train_ranker::train_ranker(&base_dir, &rows, &out, &options, &mut progress)?;
                Ok((report, rows.len(), serde_json::to_value(&options)))
            }
        }
    })
    .await
    .map_err(|e| Error::Internal(format!("training task: {e}")))??;

    let queries = heldout_queries(dataset)?;
    let heldout = if queries.is_empty() {
        tracing::warn!("the export holds out no labelled queries: the manifest has no held-out metrics");
        None
    } else {
        let parent = registry.serving_choice(config);
        let evaluator = crate::eval_server::LoopbackEvaluator::new(config);
        let scorer = gate::Scorer { evaluator: &evaluator, context_turns: config.retrieve.context_turns };
        Some(gate::heldout(&scorer, role, &parent, &folder, &queries, knowledge).await?)
    };
    let manifest = TrainedManifest {
        role,
        version: crate::model::hf_folder::model_version(&folder)?,
        parent: crate::model::hf_folder::model_version(&base)?,
        training_set: manifest.version,
        training_set_dir: dataset.to_owned(),
        examples,
        hyperparameters: hyperparameters.map_err(|e| Error::Internal(e.to_string()))?,
        steps: report.steps,
        resumed_at: report.resumed_at,
        first_loss: report.losses.first().copied(),
        last_loss: report.losses.last().copied(),
        seconds: report.seconds,
        device: Some(report.device.clone()),
        created_ms: now_ms(),
        heldout,
    };
    manifest.write(&folder)?;
    Ok(Trained { name, folder, manifest })
}

/// The gate's verdict on `version`, and whether the registry now serves it.
pub struct Promotion {
    pub gate: Option<GateReport>,
    /// The generator's gate (a generator has no retrieval gate).
    pub generator_gate: Option<GeneratorGateReport>,
    pub promoted: bool,
}

/// A trained version's folder and manifest.
pub fn trained(config: &Config, version: &str) -> Result<(PathBuf, TrainedManifest)> {
    let folder = registry::resolve(&config.data_dir, version);
    let manifest = TrainedManifest::read(&folder)?.ok_or_else(|| {
        Error::NotFound(format!(
            "{version}: no trained model there ({} has no {}); `aitl models list` shows the versions",
            folder.display(),
            registry::manifest::FILE
        ))
    })?;
    Ok((folder, manifest))
}

/// Runs the gate on `version` (a trained folder's name) against what
/// serves now and, when it passes (or `force`), makes it serve.
pub async fn promote(
    config: &Config,
    version: &str,
    knowledge: Vec<KnowledgeObject>,
    force: bool,
) -> Result<Promotion> {
    let (folder, manifest) = trained(config, version)?;
    let role = manifest.role;
    let mut registry = Registry::load(&config.data_dir)?;
    if registry.role(role).serving.as_deref() == Some(version) {
        return Err(Error::AlreadyExists(format!("{version} already serves as the {role}")));
    }
    let mut gate_error = None;
    let generator_gate = if role == Role::Generator {
        let serving = registry.serving_config(config).generator_path()?.ok_or_else(|| {
            Error::FailedPrecondition("no generator serves, so there is nothing to gate a generator against".into())
        })?;
        let serving_label = registry.role(role).serving.clone().unwrap_or_else(|| "the configured generator".into());
        let heldout: Vec<GeneratorRow> = datasets::read_rows(&manifest.training_set_dir, "heldout", "generator")?;
        let training: Vec<GeneratorRow> = datasets::read_rows(&manifest.training_set_dir, "train", "generator")?;
        let (options, precision) = (config.promotion.clone(), config.models.generator_precision);
        let folder = folder.clone();
        let candidate = version.to_string();
        let decided = tokio::task::spawn_blocking(move || {
            generator_gate::decide(
                &options,
                precision,
                (&serving_label, &serving),
                (&candidate, &folder),
                &heldout,
                &training,
            )
        })
        .await
        .map_err(|e| Error::Internal(format!("the generator gate: {e}")))?;
        match decided {
            Ok(gate) => Some(gate),
            // A forced promotion goes ahead without a gate that cannot run,
            // and says why in the registry's trail.
            Err(e) if force => {
                gate_error = Some(e.to_string());
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let gate = if role == Role::Generator {
        None
    } else {
        let queries = heldout_queries(&manifest.training_set_dir)?;
        let training = labelled_queries(&manifest.training_set_dir, "train")?;
        let serving_label = registry.role(role).serving.clone().unwrap_or_else(|| "the configured model".into());
        let input = GateInput {
            role,
            candidate_version: version,
            candidate_folder: &folder,
            serving_label,
            serving: registry.serving_choice(config),
            heldout: &queries,
            training: &training,
            knowledge,
        };
        let evaluator = crate::eval_server::LoopbackEvaluator::new(config);
        let scorer = gate::Scorer { evaluator: &evaluator, context_turns: config.retrieve.context_turns };
        Some(gate::decide(&scorer, &config.promotion, input).await?)
    };
    let passed = gate.as_ref().is_some_and(|g| g.accepted) || generator_gate.as_ref().is_some_and(|g| g.accepted);
    let promoted = passed || force;
    if promoted {
        let reasons = gate.as_ref().map(|g| &g.reasons).or(generator_gate.as_ref().map(|g| &g.reasons));
        let note = match (reasons, passed) {
            (Some(reasons), true) => format!("gate passed: {}", reasons.join("; ")),
            (Some(reasons), false) => format!("forced past the gate: {}", reasons.join("; ")),
            (None, _) => match &gate_error {
                Some(e) => format!("forced; the gate could not run: {e}"),
                None => "forced (no offline gate for this role)".into(),
            },
        };
        registry.promote(role, version, note);
        registry.save(&config.data_dir)?;
    }
    Ok(Promotion { gate, generator_gate, promoted })
}
