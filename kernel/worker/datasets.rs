//! Training sets from judged annotations, split 90/10 by time: the
//! interactions that received feedback, ordered by when they happened; the
//! last 10% are held out for evaluation, so a model is always tested on
//! conversations later than any it learned from.
//!
//! - retriever: (anchor = query with context, positive, negative) triplets
//!   for sentence-transformers' MultipleNegativesRankingLoss; positives are
//!   objects labelled relevant and the missing knowledge agents found,
//!   hard negatives the shown objects labelled irrelevant. Positives of a
//!   query without hard negatives go to (anchor, positive) pairs.
//! - ranker: (query, passage, label) with 1 relevant, 0.5 partially, 0 not.
//! - generator: (prompt, chosen, rejected, weight) in TRL's conversational
//!   format for ORPO: preferences weighted by their strength, and adoptions
//!   (an edited reply beats the candidate it came from; an adopted candidate
//!   beats the others; a rejected one loses to what the agent sent instead).
//! - queries: each judged interaction's question, context and the knowledge
//!   ids agents found relevant or missing; the held-out ones are what the
//!   promotion gate scores models on.
//!
//! An annotation trains unless a judge check failed on it (when the judge
//! ran, in drop mode); in the judge's weight mode every annotation trains
//! and each row carries its annotation's weight (`weights.rs`).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{
    journal::Journal,
    judge::{JudgeMode, JudgeOptions},
    rows::{AnnotationRow, Decision, Feedback, InteractionRow, Label, Turn, now_millis},
    weights::annotation_weights,
};
use crate::{
    engine::grounding,
    error::{Error, Result},
    kb::{KnowledgeStore, semantic::QueryComposition},
    model::chat::Role,
    proto::{ConversationTurn, KnowledgeObject, Speaker},
};

/// Knowledge objects at the exact versions interactions showed.
pub trait KnowledgeSource {
    /// A tenant's object (the tenant an interaction was shown to).
    fn object(&self, tenant: &str, id: &str, version: Option<u64>) -> Result<KnowledgeObject>;
    /// Every live object at its latest version (what models are evaluated
    /// over): the models serve every tenant, so every tenant's objects.
    fn live_objects(&self) -> Result<Vec<KnowledgeObject>>;
}

impl KnowledgeSource for KnowledgeStore {
    fn object(&self, tenant: &str, id: &str, version: Option<u64>) -> Result<KnowledgeObject> {
        self.get(tenant, id, version.unwrap_or(0), true).map_err(Error::from)
    }

    fn live_objects(&self) -> Result<Vec<KnowledgeObject>> {
        Ok(self.objects_with_vectors("")?.into_iter().map(|stored| stored.object).collect())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieverTriplet {
    pub anchor: String,
    pub positive: String,
    pub negative: String,
    /// How much the row counts in training, in [0, 1]: 1 unless the judge
    /// runs in weight mode (the lesser of the positive's and the negative's
    /// annotation weights); exports written before weights read as 1.
    #[serde(default = "unit_weight")]
    pub weight: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrieverPair {
    pub anchor: String,
    pub positive: String,
    /// As [`RetrieverTriplet::weight`].
    #[serde(default = "unit_weight")]
    pub weight: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankerRow {
    pub query: String,
    pub passage: String,
    pub label: f32,
    /// The label's annotation weight (1 unless the judge runs in weight mode).
    #[serde(default = "unit_weight")]
    pub weight: f32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorRow {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
    /// How much the pair counts in training (see [`preference_weight`]);
    /// exports written before weights existed read as 1.
    #[serde(default = "unit_weight")]
    pub weight: f32,
}

fn unit_weight() -> f32 {
    1.0
}

/// A judged question with the ids agents labelled: what retrieval and
/// ranking are scored on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledInteraction {
    pub interaction_id: String,
    pub query: String,
    pub context: Vec<Turn>,
    /// Labelled relevant or reported missing.
    pub relevant: Vec<String>,
    pub irrelevant: Vec<String>,
}

impl LabelledInteraction {
    pub fn to_query(&self) -> crate::eval::dstc11::LabelledQuery {
        crate::eval::dstc11::LabelledQuery {
            id: self.interaction_id.clone(),
            index: 0,
            query: self.query.clone(),
            context: Builder::turns(&self.context),
            relevant: self.relevant.clone(),
            judged_irrelevant: Some(self.irrelevant.clone()),
            reference_reply: String::new(),
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sets {
    pub retriever: Vec<RetrieverTriplet>,
    pub retriever_pairs: Vec<RetrieverPair>,
    pub ranker: Vec<RankerRow>,
    pub generator: Vec<GeneratorRow>,
    pub queries: Vec<LabelledInteraction>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Names this export: the content hash of its rows.
    pub version: String,
    pub created_ms: i64,
    /// Log sequences the journal covered.
    pub log_sequences: (u64, u64),
    pub judge_enabled: bool,
    /// Drop: rejected annotations left out; weight: all in, weighted.
    #[serde(default)]
    pub judge_mode: JudgeMode,
    /// Weight mode: annotations that train with a weight below 1.
    #[serde(default)]
    pub down_weighted: usize,
    pub annotations: usize,
    /// Annotations a judge check failed on, per check (one annotation can fail several).
    pub rejected_by_check: BTreeMap<String, usize>,
    pub rejected: usize,
    pub interactions_train: usize,
    pub interactions_heldout: usize,
    /// Interactions created at or after this time are held out.
    pub heldout_from_ms: i64,
    /// Rows per set, train and held out.
    pub counts: BTreeMap<String, (usize, usize)>,
}

pub struct TrainingSets {
    pub train: Sets,
    pub heldout: Sets,
    pub manifest: Manifest,
}

/// Share of the interactions (by time) held out.
pub const HELDOUT_SHARE: f64 = 0.1;

fn relevance_score(label: Label) -> f32 {
    match label {
        Label::Relevant => 1.0,
        Label::PartiallyRelevant => 0.5,
        Label::Irrelevant => 0.0,
    }
}

fn message(role: &str, content: &str) -> Message {
    Message { role: role.into(), content: content.into() }
}

struct Builder<'a> {
    knowledge: &'a dyn KnowledgeSource,
    composition: QueryComposition,
    /// (tenant, id, version) → text.
    texts: HashMap<(String, String, Option<u64>), String>,
    /// Annotation id → weight; absent: 1.
    weights: HashMap<String, f32>,
}

impl Builder<'_> {
    fn weight(&self, a: &AnnotationRow) -> f32 {
        self.weights.get(&a.annotation_id).copied().unwrap_or(1.0)
    }

    fn text(&mut self, tenant: &str, id: &str, version: Option<u64>) -> Result<String> {
        let key = (tenant.to_string(), id.to_string(), version);
        if let Some(text) = self.texts.get(&key) {
            return Ok(text.clone());
        }
        let text = self.knowledge.object(tenant, id, version)?.text;
        self.texts.insert(key, text.clone());
        Ok(text)
    }

    fn turns(context: &[Turn]) -> Vec<ConversationTurn> {
        context
            .iter()
            .map(|t| ConversationTurn {
                speaker: if t.speaker == "agent" { Speaker::Agent } else { Speaker::Customer } as i32,
                text: t.text.clone(),
            })
            .collect()
    }

    fn anchor(&self, interaction: &InteractionRow) -> String {
        self.composition.compose(&interaction.query, &Self::turns(&interaction.context))
    }

    fn prompt(&mut self, interaction: &InteractionRow) -> Result<Vec<Message>> {
        let knowledge = interaction
            .shown
            .iter()
            .map(|s| self.knowledge.object(&interaction.tenant, &s.knowledge_id, Some(s.version)))
            .collect::<Result<Vec<_>>>()?;
        let mut conversation = Self::turns(&interaction.context);
        conversation.push(ConversationTurn { speaker: Speaker::Customer as i32, text: interaction.query.clone() });
        let system = if interaction.system_prompt.is_empty() {
            grounding::DEFAULT_SYSTEM_PROMPT
        } else {
            &interaction.system_prompt
        };
        Ok(grounding::messages(system, &knowledge, &conversation)
            .into_iter()
            .map(|(role, content)| {
                let role = match role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                message(role, &content)
            })
            .collect())
    }

    /// Adds one interaction's accepted annotations to `sets`.
    fn add(&mut self, interaction: &InteractionRow, annotations: &[&AnnotationRow], sets: &mut Sets) -> Result<()> {
        let anchor = self.anchor(interaction);
        let (mut positives, mut negatives) = (Vec::new(), Vec::new());
        let mut seen_positive = HashSet::new();
        let (mut relevant, mut irrelevant) = (Vec::new(), Vec::new());
        let mut labelled = false;
        for a in annotations {
            let weight = self.weight(a);
            match &a.feedback {
                Feedback::Relevance { judgements } => {
                    labelled = true;
                    for (id, label) in judgements {
                        match label {
                            Label::Relevant => relevant.push(id.clone()),
                            Label::Irrelevant => irrelevant.push(id.clone()),
                            Label::PartiallyRelevant => {}
                        }
                        let passage = self.text(&interaction.tenant, id, interaction.shown_version(id))?;
                        sets.ranker.push(RankerRow {
                            query: anchor.clone(),
                            passage: passage.clone(),
                            label: relevance_score(*label),
                            weight,
                        });
                        match label {
                            Label::Relevant if seen_positive.insert(id.clone()) => positives.push((passage, weight)),
                            Label::Irrelevant => negatives.push((passage, weight)),
                            _ => {}
                        }
                    }
                }
                Feedback::Missing { knowledge_id: Some(id), .. } => {
                    labelled = true;
                    relevant.push(id.clone());
                    let passage = self.text(&interaction.tenant, id, None)?;
                    if seen_positive.insert(id.clone()) {
                        sets.ranker.push(RankerRow {
                            query: anchor.clone(),
                            passage: passage.clone(),
                            label: 1.0,
                            weight,
                        });
                        positives.push((passage, weight));
                    }
                }
                _ => {}
            }
        }
        if labelled {
            let mut unique = HashSet::new();
            relevant.retain(|id| unique.insert(id.clone()));
            irrelevant.retain(|id| !unique.contains(id) && unique.insert(id.clone()));
            sets.queries.push(LabelledInteraction {
                interaction_id: interaction.interaction_id.clone(),
                query: interaction.query.clone(),
                context: interaction.context.clone(),
                relevant,
                irrelevant,
            });
        }
        for (i, (positive, weight)) in positives.into_iter().enumerate() {
            match negatives.get(i % negatives.len().max(1)) {
                Some((negative, negative_weight)) => sets.retriever.push(RetrieverTriplet {
                    anchor: anchor.clone(),
                    positive,
                    negative: negative.clone(),
                    weight: weight.min(*negative_weight),
                }),
                None => sets.retriever_pairs.push(RetrieverPair { anchor: anchor.clone(), positive, weight }),
            }
        }

        let pairs = generator_pairs(interaction, annotations, |a| self.weight(a));
        if !pairs.is_empty() {
            let prompt = self.prompt(interaction)?;
            for (chosen, rejected, weight) in pairs {
                sets.generator.push(GeneratorRow {
                    prompt: prompt.clone(),
                    chosen: vec![message("assistant", &chosen)],
                    rejected: vec![message("assistant", &rejected)],
                    weight,
                });
            }
        }
        Ok(())
    }
}

/// A pairwise preference's weight from its strength: slightly better 0.5,
/// better 1, significantly better 1.5 (unspecified counts as better). The
/// scale is linear in the agent's grade and centred on 1, so a set of
/// "better" pairs trains exactly as TRL's unweighted ORPO.
pub fn preference_weight(strength: u32) -> f32 {
    match strength {
        1 => 0.5,
        3 => 1.5,
        _ => 1.0,
    }
}

/// One interaction's (chosen, rejected, weight) replies, first of each
/// (chosen, rejected) kept:
/// - a preference: the preferred candidate beats the other, weighted by
///   [`preference_weight`];
/// - edited: the text the agent sent beats the candidate it edited;
/// - adopted as is: the candidate beats every other candidate;
/// - rejected: the candidate loses to the text the agent sent instead,
///   when the agent sent one.
///
/// Adoptions weigh 1. Every pair's weight is multiplied by its
/// annotation's (`weight`: 1 unless the judge runs in weight mode).
fn generator_pairs(
    interaction: &InteractionRow,
    annotations: &[&AnnotationRow],
    weight: impl Fn(&AnnotationRow) -> f32,
) -> Vec<(String, String, f32)> {
    let mut pairs: Vec<(String, String, f32)> = Vec::new();
    for a in annotations {
        let w = weight(a);
        match &a.feedback {
            Feedback::Preference { preferred, other, strength, .. } => {
                if let (Some(p), Some(o)) = (interaction.candidate(preferred), interaction.candidate(other)) {
                    pairs.push((p.text.clone(), o.text.clone(), preference_weight(*strength) * w));
                }
            }
            Feedback::Adoption { candidate_id, decision, sent_text, .. } => {
                let Some(adopted) = interaction.candidate(candidate_id) else { continue };
                let differs = !sent_text.trim().is_empty() && sent_text.trim() != adopted.text.trim();
                match decision {
                    Decision::Edited | Decision::Rejected if differs => {
                        pairs.push((sent_text.clone(), adopted.text.clone(), w))
                    }
                    Decision::AdoptedAsIs => pairs.extend(
                        interaction
                            .candidates
                            .iter()
                            .filter(|c| c.candidate_id != *candidate_id && c.text.trim() != adopted.text.trim())
                            .map(|c| (adopted.text.clone(), c.text.clone(), w)),
                    ),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let mut unique = HashSet::new();
    pairs.retain(|(chosen, rejected, _)| unique.insert((chosen.clone(), rejected.clone())));
    pairs
}

/// Which annotations the judge failed, with the checks that failed them.
pub fn rejections(journal: &Journal) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for ((annotation, check), v) in journal.latest_verdicts() {
        if !v.pass {
            out.entry(annotation.to_string()).or_default().push(check.to_string());
        }
    }
    out.values_mut().for_each(|checks| checks.sort());
    out
}

/// Builds the train and held-out sets from the journal, dropping the
/// annotations a judge check failed when `judge_enabled`.
pub fn build(
    journal: &Journal,
    knowledge: &dyn KnowledgeSource,
    composition: QueryComposition,
    judge_enabled: bool,
) -> Result<TrainingSets> {
    let judge = JudgeOptions { enabled: judge_enabled, mode: JudgeMode::Drop, ..JudgeOptions::default() };
    build_with(journal, knowledge, composition, &judge)
}

/// Builds the train and held-out sets from the journal as `judge` says:
/// switched off, every annotation trains with weight 1; in drop mode the
/// annotations a check failed are left out; in weight mode every
/// annotation trains with its weight (`weights.rs`).
pub fn build_with(
    journal: &Journal,
    knowledge: &dyn KnowledgeSource,
    composition: QueryComposition,
    judge: &JudgeOptions,
) -> Result<TrainingSets> {
    let judge_enabled = judge.enabled;
    let mode = judge.mode;
    let rejected = if judge_enabled { rejections(journal) } else { HashMap::new() };
    let weights =
        if judge_enabled && mode == JudgeMode::Weight { annotation_weights(journal, judge) } else { HashMap::new() };
    let dropped = |id: &str| mode == JudgeMode::Drop && rejected.contains_key(id);
    let mut by_interaction: HashMap<&str, Vec<&AnnotationRow>> = HashMap::new();
    for a in journal.annotations.iter().filter(|a| !dropped(&a.annotation_id)) {
        by_interaction.entry(a.interaction_id.as_str()).or_default().push(a);
    }
    let mut interactions: Vec<&InteractionRow> =
        by_interaction.keys().filter_map(|id| journal.interactions.get(*id)).collect();
    interactions.sort_by(|a, b| (a.created_ms, &a.interaction_id).cmp(&(b.created_ms, &b.interaction_id)));
    let heldout_count = (interactions.len() as f64 * HELDOUT_SHARE).round() as usize;
    let boundary = interactions.len() - heldout_count;

    let down_weighted = weights.values().filter(|w| **w < 1.0).count();
    let mut builder = Builder { knowledge, composition, texts: HashMap::new(), weights };
    let (mut train, mut heldout) = (Sets::default(), Sets::default());
    for (i, interaction) in interactions.iter().enumerate() {
        let sets = if i < boundary { &mut train } else { &mut heldout };
        builder.add(interaction, &by_interaction[interaction.interaction_id.as_str()], sets)?;
    }

    let mut rejected_by_check = BTreeMap::new();
    for checks in rejected.values() {
        for check in checks {
            *rejected_by_check.entry(check.clone()).or_insert(0) += 1;
        }
    }
    let counts = BTreeMap::from([
        ("retriever".to_string(), (train.retriever.len(), heldout.retriever.len())),
        ("retriever_pairs".to_string(), (train.retriever_pairs.len(), heldout.retriever_pairs.len())),
        ("ranker".to_string(), (train.ranker.len(), heldout.ranker.len())),
        ("generator".to_string(), (train.generator.len(), heldout.generator.len())),
        ("queries".to_string(), (train.queries.len(), heldout.queries.len())),
    ]);
    let mut hasher = sha2::Sha256::new();
    hasher.update(serde_json::to_vec(&(&train, &heldout)).map_err(|e| Error::Internal(e.to_string()))?);
    let version = hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
    let first = journal.annotations.iter().map(|a| a.sequence).chain(journal.interactions.values().map(|i| i.sequence));
    let manifest = Manifest {
        version,
        created_ms: now_millis(),
        log_sequences: (first.min().unwrap_or(0), journal.last_sequence),
        judge_enabled,
        judge_mode: mode,
        down_weighted,
        annotations: journal.annotations.len(),
        rejected: rejected.len(),
        rejected_by_check,
        interactions_train: boundary,
        interactions_heldout: heldout_count,
        heldout_from_ms: interactions.get(boundary).map_or(i64::MAX, |i| i.created_ms),
        counts,
    };
    Ok(TrainingSets { train, heldout, manifest })
}

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for row in rows {
        text.push_str(&serde_json::to_string(row).map_err(|e| Error::Internal(e.to_string()))?);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| Error::Internal(format!("{}: {e}", path.display())))
}

impl TrainingSets {
    /// Writes `{root}/{version}/{train,heldout}/*.jsonl` and `manifest.json`;
    /// returns the export's folder. The folder is written under a temporary
    /// name and renamed, so a folder with a manifest is always complete.
    pub fn export(&self, root: &Path) -> Result<PathBuf> {
        let folder = root.join(&self.manifest.version);
        let partial = root.join(format!(".{}.partial", self.manifest.version));
        let fail = |e: std::io::Error| Error::Internal(format!("{}: {e}", partial.display()));
        let _ = std::fs::remove_dir_all(&partial);
        for (split, sets) in [("train", &self.train), ("heldout", &self.heldout)] {
            let dir = partial.join(split);
            std::fs::create_dir_all(&dir).map_err(fail)?;
            write_jsonl(&dir.join("retriever.jsonl"), &sets.retriever)?;
            write_jsonl(&dir.join("retriever_pairs.jsonl"), &sets.retriever_pairs)?;
            write_jsonl(&dir.join("ranker.jsonl"), &sets.ranker)?;
            write_jsonl(&dir.join("generator.jsonl"), &sets.generator)?;
            write_jsonl(&dir.join("queries.jsonl"), &sets.queries)?;
        }
        let manifest = serde_json::to_string_pretty(&self.manifest).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(partial.join("manifest.json"), manifest).map_err(fail)?;
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::rename(&partial, &folder).map_err(fail)?;
        Ok(folder)
    }
}

/// The rows of one set of an export folder: `{dir}/{split}/{set}.jsonl`.
pub fn read_rows<T: serde::de::DeserializeOwned>(dir: &Path, split: &str, set: &str) -> Result<Vec<T>> {
    let path = dir.join(split).join(format!("{set}.jsonl"));
    if !path.is_file() {
        return Err(Error::NotFound(format!(
            "{}: missing (an `aitl worker export` folder of this version of aitl?)",
            path.display()
        )));
    }
    crate::kb::jsonl::read_lines(&path)
}

/// An export folder's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    crate::model::hf_folder::read_json(&path)?
        .ok_or_else(|| Error::NotFound(format!("{}: missing (an `aitl worker export` folder?)", path.display())))
}

#[cfg(test)]
mod generator_tests {
    use super::*;
    use crate::worker::rows::{CandidateRow, Kind};

    fn interaction() -> InteractionRow {
        let candidate = |id: &str, text: &str| CandidateRow {
            candidate_id: id.into(),
            text: text.into(),
            cited: Vec::new(),
            model_version: "m@1".into(),
        };
        InteractionRow {
            tenant: crate::tenancy::DEFAULT_TENANT.into(),
            sequence: 1,
            interaction_id: "g1".into(),
            kind: Kind::Generate,
            created_ms: 0,
            agent_id: "a".into(),
            case_id: "c".into(),
            query: "Where is my parcel?".into(),
            context: Vec::new(),
            shown: Vec::new(),
            candidates: vec![candidate("g1/c0", "It ships today."), candidate("g1/c1", "No idea.")],
            system_prompt: String::new(),
            models: BTreeMap::new(),
        }
    }

    fn annotation(feedback: Feedback) -> AnnotationRow {
        AnnotationRow {
            tenant: crate::tenancy::DEFAULT_TENANT.into(),
            sequence: 2,
            annotation_id: "n1".into(),
            interaction_id: "g1".into(),
            agent_id: "a".into(),
            case_id: "c".into(),
            shown_ms: 0,
            annotated_ms: 0,
            feedback,
        }
    }

    fn pairs(feedback: Feedback) -> Vec<(String, String, f32)> {
        generator_pairs(&interaction(), &[&annotation(feedback)], |_| 1.0)
    }

    fn pair(chosen: &str, rejected: &str, weight: f32) -> (String, String, f32) {
        (chosen.into(), rejected.into(), weight)
    }

    #[test]
    fn preference_strength_weights_the_pair() {
        for (strength, weight) in [(0, 1.0), (1, 0.5), (2, 1.0), (3, 1.5)] {
            let feedback = Feedback::Preference {
                preferred: "g1/c0".into(),
                other: "g1/c1".into(),
                strength,
                rationale: String::new(),
            };
            assert_eq!(pairs(feedback), [pair("It ships today.", "No idea.", weight)], "strength {strength}");
        }
    }

    #[test]
    fn a_rejected_candidate_loses_to_the_text_the_agent_sent() {
        let rejected = |sent: &str| Feedback::Adoption {
            candidate_id: "g1/c1".into(),
            decision: Decision::Rejected,
            sent_text: sent.into(),
            rationale: String::new(),
        };
        assert_eq!(
            pairs(rejected("Your parcel arrives Friday.")),
            [pair("Your parcel arrives Friday.", "No idea.", 1.0)]
        );
        // Nothing sent, or the candidate's own text: no pair.
        assert!(pairs(rejected("  ")).is_empty());
        assert!(pairs(rejected("No idea. ")).is_empty());
    }

    #[test]
    fn adoptions_weigh_one() {
        let adoption = |decision, sent: &str| Feedback::Adoption {
            candidate_id: "g1/c0".into(),
            decision,
            sent_text: sent.into(),
            rationale: String::new(),
        };
        assert_eq!(pairs(adoption(Decision::AdoptedAsIs, "")), [pair("It ships today.", "No idea.", 1.0)]);
        assert_eq!(
            pairs(adoption(Decision::Edited, "It ships today by courier.")),
            [pair("It ships today by courier.", "It ships today.", 1.0)]
        );
    }
}

#[cfg(test)]
mod weight_tests {
    use super::*;
    use crate::worker::rows::{Kind, Row, ShownRow, Verdict};

    /// Knowledge whose text is its id.
    struct Echo;

    impl KnowledgeSource for Echo {
        fn object(&self, _: &str, id: &str, _: Option<u64>) -> Result<KnowledgeObject> {
            Ok(KnowledgeObject { id: id.into(), text: format!("text of {id}"), ..Default::default() })
        }

        fn live_objects(&self) -> Result<Vec<KnowledgeObject>> {
            Ok(Vec::new())
        }
    }

    fn journal(dir: &Path) -> Journal {
        let mut journal = Journal::open(dir).unwrap();
        for (n, (interaction, agent)) in [("r1", "a"), ("r2", "b")].into_iter().enumerate() {
            journal
                .stage(Row::Interaction(InteractionRow {
                    tenant: crate::tenancy::DEFAULT_TENANT.into(),
                    sequence: n as u64,
                    interaction_id: interaction.into(),
                    kind: Kind::Rank,
                    created_ms: n as i64,
                    agent_id: agent.into(),
                    case_id: interaction.into(),
                    query: format!("question {n}"),
                    context: Vec::new(),
                    shown: ["k1", "k2"]
                        .iter()
                        .enumerate()
                        .map(|(i, k)| ShownRow { knowledge_id: k.to_string(), version: 1, rank: i as u32 + 1 })
                        .collect(),
                    candidates: Vec::new(),
                    system_prompt: String::new(),
                    models: BTreeMap::new(),
                }))
                .unwrap();
            journal
                .stage(Row::Annotation(AnnotationRow {
                    tenant: crate::tenancy::DEFAULT_TENANT.into(),
                    sequence: 10 + n as u64,
                    annotation_id: format!("n{n}"),
                    interaction_id: interaction.into(),
                    agent_id: agent.into(),
                    case_id: interaction.into(),
                    shown_ms: 0,
                    annotated_ms: 20_000,
                    feedback: Feedback::Relevance {
                        judgements: vec![("k1".into(), Label::Relevant), ("k2".into(), Label::Irrelevant)],
                    },
                }))
                .unwrap();
        }
        journal
            .stage(Row::Verdict(Verdict {
                annotation_id: "n0".into(),
                check: "uniform_labels".into(),
                pass: false,
                score: 0.0,
                reason: String::new(),
            }))
            .unwrap();
        journal
    }

    /// Two interactions (20 × 10% rounds to none held out), one annotation
    /// each; agent a's failed. Drop mode leaves a's rows out; weight mode
    /// keeps them at failed_weight 0.1 × a's reliability relative to b's:
    /// a (0 + 1) / (1 + 2) = 1/3 over b (1 + 1) / (1 + 2) = 2/3, so 0.05.
    #[test]
    fn weight_mode_keeps_failed_annotations_with_their_weight() {
        let dir = tempfile::tempdir().unwrap();
        let journal = journal(dir.path());
        let composition = QueryComposition { context_turns: 0 };
        let weights = |sets: &TrainingSets| sets.train.ranker.iter().map(|r| r.weight).collect::<Vec<f32>>();

        let dropped = build(&journal, &Echo, composition, true).unwrap();
        assert_eq!(weights(&dropped), [1.0, 1.0]);
        assert_eq!((dropped.manifest.judge_mode, dropped.manifest.rejected), (JudgeMode::Drop, 1));

        let off = build(&journal, &Echo, composition, false).unwrap();
        assert_eq!(weights(&off), [1.0; 4]);

        let judge = JudgeOptions { mode: JudgeMode::Weight, ..JudgeOptions::default() };
        let weighted = build_with(&journal, &Echo, composition, &judge).unwrap();
        let w = weights(&weighted);
        assert_eq!(w.len(), 4);
        assert!(w[..2].iter().all(|w| (w - 0.05).abs() < 1e-6), "{w:?}");
        assert_eq!(&w[2..], [1.0, 1.0]);
        assert!(weighted.train.retriever.iter().any(|t| (t.weight - 0.05).abs() < 1e-6));
        assert_eq!((weighted.manifest.judge_mode, weighted.manifest.down_weighted), (JudgeMode::Weight, 1));
    }
}
