//! Cross-encoders: a BERT-family sequence classifier that reads a query and a
//! passage as one pair and scores how well the passage answers the query.
//! Loads the folder sentence-transformers' `CrossEncoder.save` writes (or any
//! `BertForSequenceClassification` folder): config.json with the labels,
//! model.safetensors with the pooler and classifier, tokenizer.json.
//!
//! Truncation: the passage is cut, never the query. A query that leaves no
//! room for the passage is refused (INVALID_ARGUMENT) instead of silently
//! scoring a clipped question.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;
use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use super::{
    bert::{BertEncoder, EncoderInput, Tokens, forward_chunks},
    hf_folder::{self, read_json},
    weights::SafetensorsFile,
};
use crate::{
    backend::{Activation, Device, Precision, Tensor},
    error::{Error, Result},
};

/// What turns the classifier's logits into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreActivation {
    Sigmoid,
    Identity,
    /// Across the labels of one pair.
    Softmax,
}

impl ScoreActivation {
    /// From a config value: `sigmoid`, `identity`, `softmax`, or the PyTorch
    /// class path sentence-transformers saves (`torch.nn.modules.activation.Sigmoid`).
    pub fn parse(name: &str) -> Result<Self> {
        match name.rsplit('.').next().unwrap_or(name).to_ascii_lowercase().as_str() {
            "sigmoid" => Ok(ScoreActivation::Sigmoid),
            "identity" => Ok(ScoreActivation::Identity),
            "softmax" => Ok(ScoreActivation::Softmax),
            _ => Err(Error::InvalidArgument(format!(
                "cross-encoder activation {name:?} is not supported; use sigmoid, identity or softmax"
            ))),
        }
    }

    fn apply(self, logits: &mut [f32]) {
        match self {
            ScoreActivation::Identity => {}
            ScoreActivation::Sigmoid => logits.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
            ScoreActivation::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = logits
                    .iter_mut()
                    .map(|x| {
                        *x = (*x - max).exp();
                        *x
                    })
                    .sum();
                logits.iter_mut().for_each(|x| *x /= sum);
            }
        }
    }
}

/// How a cross-encoder folder is read; `None` fields come from the folder.
#[derive(Debug, Clone, Default)]
pub struct CrossEncoderOptions {
    pub activation: Option<ScoreActivation>,
    /// With several labels, the one whose score ranks (default: the last,
    /// the "relevant" class of two-label relevance classifiers).
    pub label: Option<usize>,
    /// Arithmetic of the encoder's matrix products.
    pub precision: Precision,
}

#[derive(Deserialize)]
struct ClassifierConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    id2label: BTreeMap<String, String>,
    num_labels: Option<usize>,
    /// sentence-transformers 3–4 kept its settings here.
    sentence_transformers: Option<StActivation>,
    /// sentence-transformers ≤ 2.
    sbert_ce_default_activation_function: Option<String>,
}

#[derive(Deserialize)]
struct StActivation {
    activation_fn: Option<String>,
}

#[derive(Deserialize)]
struct LengthConfig {
    max_seq_length: Option<usize>,
    max_length: Option<usize>,
    model_max_length: Option<f64>,
}

pub struct CrossEncoder {
    encoder: BertEncoder,
    pooler: (Tensor, Tensor),
    classifier: (Tensor, Tensor),
    tokenizer: Tokenizer,
    activation: ScoreActivation,
    labels: Vec<String>,
    label: usize,
    max_length: usize,
    pair_specials: usize,
    version: String,
}

impl CrossEncoder {
    pub fn load(device: &Device, dir: &Path, options: &CrossEncoderOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: ClassifierConfig =
            read_json(&config_path)?.ok_or_else(|| Error::NotFound(format!("{} is missing", config_path.display())))?;
        if !config.architectures.is_empty()
            && !config.architectures.iter().any(|a| a == "BertForSequenceClassification")
        {
            return Err(Error::InvalidArgument(format!(
                "{}: architectures {:?}; aitl's cross-encoder reads BertForSequenceClassification checkpoints",
                config_path.display(),
                config.architectures
            )));
        }
        let encoder = BertEncoder::load_in(device, dir, options.precision)?;
        let hidden = encoder.config().hidden_size;
        let weights = SafetensorsFile::open(&dir.join("model.safetensors"))?;
        let classes = config.num_labels.unwrap_or(config.id2label.len().max(1));
        let mut labels: Vec<String> = (0..classes).map(|i| format!("LABEL_{i}")).collect();
        for (id, name) in &config.id2label {
            if let Some(slot) = id.parse::<usize>().ok().and_then(|i| labels.get_mut(i)) {
                slot.clone_from(name);
            }
        }
        let pooler = weights.linear(device, &["pooler.dense"], hidden, hidden)?;
        let classifier = weights.linear(device, &["classifier"], hidden, classes)?;

        let saved_activation = read_json::<StActivation>(&dir.join("config_sentence_transformers.json"))?
            .and_then(|c| c.activation_fn)
            .or(config.sentence_transformers.and_then(|c| c.activation_fn))
            .or(config.sbert_ce_default_activation_function);
        let activation = match (options.activation, saved_activation) {
            (Some(chosen), _) => chosen,
            (None, Some(saved)) => ScoreActivation::parse(&saved)?,
            // CrossEncoder's own default.
            (None, None) if classes == 1 => ScoreActivation::Sigmoid,
            (None, None) => ScoreActivation::Identity,
        };
        let label = options.label.unwrap_or(classes - 1);
        if label >= classes {
            return Err(Error::InvalidArgument(format!(
                "{}: ranking label {label} does not exist; the model has {classes} labels {labels:?}",
                dir.display()
            )));
        }

        let max_positions = encoder.config().max_position_embeddings;
        let saved_length = [dir.join("sentence_bert_config.json"), dir.join("tokenizer_config.json")]
            .iter()
            .map(|p| read_json::<LengthConfig>(p))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .find_map(|c| {
                c.max_seq_length.or(c.max_length).or(c.model_max_length.filter(|&l| l < 1e6).map(|l| l as usize))
            });
        let max_length = saved_length.unwrap_or(max_positions).min(max_positions);
        // Pairs are cut by hand (passage only), so the tokenizer itself never truncates.
        let tokenizer = hf_folder::tokenizer(dir, None)?;
        let pair_specials = tokenizer.get_post_processor().map_or(0, |p| p.added_tokens(true));
        let version = hf_folder::model_version(dir)?;
        Ok(CrossEncoder {
            encoder,
            pooler,
            classifier,
            tokenizer,
            activation,
            labels,
            label,
            max_length,
            pair_specials,
            version,
        })
    }

    /// `{folder name}@{weights digest}`.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    pub fn activation(&self) -> ScoreActivation {
        self.activation
    }

    /// Tokens of one pair, special tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenizes the query once and pairs it with each passage, cutting
    /// passages to fit. The query must leave room for at least one passage token.
    pub fn tokenize_pairs(&self, query: &str, passages: &[&str]) -> Result<Vec<Tokens>> {
        let tokenizer_error = |e| Error::InvalidArgument(format!("tokenizer: {e}"));
        let query_encoding = self.tokenizer.encode(query, false).map_err(tokenizer_error)?;
        let room = self.max_length.saturating_sub(self.pair_specials);
        if query_encoding.len() >= room {
            return Err(Error::InvalidArgument(format!(
                "query: {} tokens with its context; the ranker {} reads {} tokens per (query, passage) pair and never \
                 truncates the query: send a shorter query or fewer context turns",
                query_encoding.len(),
                self.version,
                self.max_length
            )));
        }
        passages
            .iter()
            .map(|passage| {
                let mut passage_encoding = self.tokenizer.encode(*passage, false).map_err(tokenizer_error)?;
                passage_encoding.truncate(room - query_encoding.len(), 0, TruncationDirection::Right);
                let pair = self
                    .tokenizer
                    .post_process(query_encoding.clone(), Some(passage_encoding), true)
                    .map_err(tokenizer_error)?;
                Ok(Tokens { ids: pair.get_ids().to_vec(), type_ids: pair.get_type_ids().to_vec() })
            })
            .collect()
    }

    /// Each pair's activated scores, one per label, in input order.
    pub fn score_tokens(&self, device: &Device, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(batch.len());
        for chunk in forward_chunks(batch) {
            let input = EncoderInput::of(chunk);
            let hidden = self.encoder.forward(device, &input)?;
            let first = device.first_rows(&hidden, &input.layout)?;
            let pooled = device.linear(&first, &self.pooler.0, Some(&self.pooler.1), Activation::Tanh)?;
            let logits = device.linear(&pooled, &self.classifier.0, Some(&self.classifier.1), Activation::None)?;
            let classes = logits.cols();
            out.extend(logits.to_host()?.chunks_exact(classes).map(|row| {
                let mut row = row.to_vec();
                self.activation.apply(&mut row);
                row
            }));
        }
        Ok(out)
    }

    /// The ranking score from a pair's label scores.
    pub fn ranking_score(&self, scores: &[f32]) -> f32 {
        scores[self.label]
    }
}
