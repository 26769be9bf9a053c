//! The promotion gate: a trained version replaces the serving one only if it
//! scores better on the held-out queries of the data it was trained from
//! (Recall@75 of Retrieve for a retriever, Precision@8 after Rank for a
//! ranker) by a margin, and loses no more than a tolerance on a guard set
//! of labelled queries the feedback never touched: a guard that shares a
//! question with the candidate's training set is refused, since a model
//! that memorised its training questions passes it easily. Both models are scored
//! the same way, by an [`Evaluator`] (in production the loopback server of
//! `crate::eval_server` over a snapshot of the live knowledge base), through
//! the public Retrieve and Rank RPCs.

use serde::Serialize;

use super::Role;
use crate::{
    error::{Error, Result},
    eval::{
        dataset::{self, LabelledQuery, Split},
        metrics::RankingMetrics,
        retrieval::{self, EvalKnowledge, EvalSet, Evaluator, RetrievalReport},
    },
    proto::KnowledgeObject,
};

pub use crate::config::promotion::PromotionOptions;

impl PromotionOptions {
    pub fn guard_split(&self) -> Result<Split> {
        Split::parse(&self.guard_split)
            .map_err(|e| Error::InvalidArgument(format!("config promotion.guard_split: {e}")))
    }

    /// The guard set's queries (at most `guard_limit`, evenly spaced), or
    /// none when no guard data set is configured.
    pub fn guard_queries(&self) -> Result<Vec<LabelledQuery>> {
        if self.guard_dataset.as_os_str().is_empty() {
            return Ok(Vec::new());
        }
        let queries = dataset::read_queries(&self.guard_dataset, self.guard_split()?)?;
        if queries.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "promotion.guard_dataset {}: its {} split holds no labelled queries",
                self.guard_dataset.display(),
                self.guard_split
            )));
        }
        Ok(evenly(queries, self.guard_limit))
    }

    /// What the reports call the guard set.
    pub fn guard_name(&self) -> String {
        format!("guard: {} {} split", retrieval::dataset_label(&self.guard_dataset), self.guard_split)
    }
}

/// At most `limit` of `rows`, evenly spaced (0: all).
pub fn evenly<T>(rows: Vec<T>, limit: usize) -> Vec<T> {
    if limit == 0 || rows.len() <= limit {
        return rows;
    }
    let step = rows.len() as f64 / limit as f64;
    let picks: std::collections::HashSet<usize> = (0..limit).map(|i| (i as f64 * step) as usize).collect();
    rows.into_iter().enumerate().filter(|(i, _)| picks.contains(i)).map(|(_, r)| r).collect()
}

/// How a guard set meets a candidate's training set.
#[derive(Debug, Clone, Serialize)]
pub struct GuardOverlap {
    pub guard_queries: usize,
    /// Guard questions (context and question) the candidate was trained on.
    pub shared_queries: usize,
    /// Guard queries with a relevant object that was a training query's
    /// relevant object: reported, not refused (many data sets, DSTC11 among
    /// them, cannot avoid it).
    pub shared_relevant: usize,
}

impl GuardOverlap {
    pub fn between(guard: &[LabelledQuery], training: &[LabelledQuery]) -> GuardOverlap {
        let keys: std::collections::HashSet<String> = training.iter().map(LabelledQuery::key).collect();
        let relevant: std::collections::HashSet<&str> =
            training.iter().flat_map(|q| q.relevant.iter().map(String::as_str)).collect();
        GuardOverlap {
            guard_queries: guard.len(),
            shared_queries: guard.iter().filter(|q| keys.contains(&q.key())).count(),
            shared_relevant: guard
                .iter()
                .filter(|q| q.relevant.iter().any(|id| relevant.contains(id.as_str())))
                .count(),
        }
    }

    /// The check in words, and whether it passes.
    pub fn check(&self) -> (bool, String) {
        let objects = format!(
            "{} of {} guard queries have a relevant object the training set labelled relevant",
            self.shared_relevant, self.guard_queries
        );
        if self.shared_queries == 0 {
            (true, format!("the guard set shares no question with the training set ({objects})"))
        } else {
            (
                false,
                format!(
                    "the guard set overlaps the candidate's training set: {} of {} guard questions were trained on, \
                     so it cannot show a regression (use a guard disjoint from training, e.g. promotion.guard_split = \"guard\")",
                    self.shared_queries, self.guard_queries
                ),
            )
        }
    }
}

pub use crate::eval::retrieval::ModelChoice;

impl ModelChoice {
    /// With `version`'s folder in `role`'s place.
    pub fn with(&self, role: Role, folder: &std::path::Path) -> ModelChoice {
        let mut choice = self.clone();
        let path = folder.to_string_lossy().into_owned();
        match role {
            Role::Retriever => choice.embedder = path,
            Role::Ranker => choice.ranker = path,
            Role::Generator => {}
        }
        choice
    }
}

/// The role's metric from a report: Recall@75 of Retrieve; Precision@8
/// after Rank, or on agents' labels nDCG@10 after Rank. Agents judge the
/// eight or so objects they were shown, so a condensed list holds about
/// eight and its Precision@8 hardly depends on the order; nDCG@10 does.
pub fn metric(role: Role, report: &RetrievalReport) -> Result<(&'static str, f64, RankingMetrics)> {
    match role {
        Role::Retriever => Ok(("recall@75", report.metrics.recall_at(75).unwrap_or(0.0), report.metrics.clone())),
        Role::Ranker => {
            let ranked = report
                .ranked
                .as_ref()
                .ok_or_else(|| Error::Unavailable("the evaluation server loaded no ranker".into()))?;
            Ok(if report.condensed {
                ("ndcg@10 over judged objects", ranked.metrics.ndcg_at_10, ranked.metrics.clone())
            } else {
                ("precision@8", ranked.metrics.precision_at(8).unwrap_or(0.0), ranked.metrics.clone())
            })
        }
        Role::Generator => Err(Error::InvalidArgument(
            "generators have no offline gate: compare them as champion and challenger (`aitl eval feedback`)".into(),
        )),
    }
}

/// What the gate scores through: an evaluator and the context turns the
/// serving config composes queries with.
pub struct Scorer<'a> {
    pub evaluator: &'a dyn Evaluator,
    pub context_turns: usize,
}

impl Scorer<'_> {
    /// Scores `models` on `queries` over `knowledge` for `role`'s metric.
    pub async fn score(
        &self,
        role: Role,
        models: &ModelChoice,
        name: &str,
        knowledge: EvalKnowledge,
        queries: &[LabelledQuery],
        split: &str,
    ) -> Result<(&'static str, f64, RankingMetrics)> {
        let set = EvalSet { name, knowledge, queries, split: split.into(), subsets: Vec::new() };
        let report = self.evaluator.evaluate(models, &set, self.context_turns, role == Role::Ranker).await?;
        metric(role, &report)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub set: String,
    pub queries: usize,
    pub metric: String,
    pub serving: f64,
    pub candidate: f64,
    pub serving_metrics: RankingMetrics,
    pub candidate_metrics: RankingMetrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub role: Role,
    pub candidate: String,
    pub serving: String,
    pub heldout: Comparison,
    pub guard: Option<Comparison>,
    pub guard_overlap: Option<GuardOverlap>,
    pub accepted: bool,
    /// Each check and how it went.
    pub reasons: Vec<String>,
}

/// What the gate compares: the candidate's folder against what serves now.
pub struct GateInput<'a> {
    pub role: Role,
    pub candidate_version: &'a str,
    pub candidate_folder: &'a std::path::Path,
    pub serving_label: String,
    pub serving: ModelChoice,
    /// The held-out queries of the candidate's training set.
    pub heldout: &'a [LabelledQuery],
    /// The queries it was trained on: the guard must share none.
    pub training: &'a [LabelledQuery],
    /// A snapshot of the live knowledge base.
    pub knowledge: Vec<KnowledgeObject>,
}

pub async fn decide(scorer: &Scorer<'_>, options: &PromotionOptions, input: GateInput<'_>) -> Result<GateReport> {
    let role = input.role;
    if input.heldout.is_empty() {
        return Err(Error::FailedPrecondition(format!(
            "{}: the training set holds out no labelled queries, so the gate cannot score it",
            input.candidate_version
        )));
    }
    let candidate = input.serving.with(role, input.candidate_folder);
    let compare =
        |set: String, serving: (&str, f64, RankingMetrics), candidate: (&str, f64, RankingMetrics)| Comparison {
            set,
            queries: candidate.2.queries,
            metric: candidate.0.into(),
            serving: serving.1,
            candidate: candidate.1,
            serving_metrics: serving.2,
            candidate_metrics: candidate.2,
        };
    let heldout_name = "held-out feedback";
    let live = |objects: &Vec<KnowledgeObject>| EvalKnowledge::Objects(objects.clone());
    let on_serving =
        scorer.score(role, &input.serving, "live", live(&input.knowledge), input.heldout, heldout_name).await?;
    let on_candidate =
        scorer.score(role, &candidate, "live", live(&input.knowledge), input.heldout, heldout_name).await?;
    let heldout = compare(heldout_name.into(), on_serving, on_candidate);

    let guard_queries = options.guard_queries()?;
    let guard_overlap = (!guard_queries.is_empty()).then(|| GuardOverlap::between(&guard_queries, input.training));
    // An overlapping guard refuses without being scored: its score would mean nothing.
    let guard = if guard_queries.is_empty() || guard_overlap.as_ref().is_some_and(|o| o.shared_queries > 0) {
        None
    } else {
        let name = options.guard_name();
        let knowledge = || EvalKnowledge::Dataset(options.guard_dataset.clone());
        // Shares its scratch knowledge base and vectors with `aitl eval retrieval`.
        let scratch = retrieval::scratch_name(&options.guard_dataset);
        let serving = scorer.score(role, &input.serving, &scratch, knowledge(), &guard_queries, &name).await?;
        let candidate = scorer.score(role, &candidate, &scratch, knowledge(), &guard_queries, &name).await?;
        Some(compare(name, serving, candidate))
    };

    let (accepted, reasons) = verdict(&heldout, guard.as_ref(), guard_overlap.as_ref(), options);
    Ok(GateReport {
        role,
        candidate: input.candidate_version.into(),
        serving: input.serving_label,
        heldout,
        guard,
        guard_overlap,
        accepted,
        reasons,
    })
}

/// Whether the candidate passes, and each check's outcome in words.
pub fn verdict(
    heldout: &Comparison,
    guard: Option<&Comparison>,
    overlap: Option<&GuardOverlap>,
    options: &PromotionOptions,
) -> (bool, Vec<String>) {
    let mut accepted = true;
    let mut reasons = Vec::new();
    let gain = heldout.candidate - heldout.serving;
    let scores = |c: &Comparison| {
        format!("{} on {} queries of {}: {:.4} → {:.4}", c.metric, c.queries, c.set, c.serving, c.candidate)
    };
    if gain >= options.min_gain {
        reasons.push(format!("{} ({gain:+.4} ≥ {})", scores(heldout), options.min_gain));
    } else {
        accepted = false;
        reasons.push(format!("{} ({gain:+.4}), below the required gain of {}", scores(heldout), options.min_gain));
    }
    if let Some(overlap) = overlap {
        let (disjoint, reason) = overlap.check();
        accepted &= disjoint;
        reasons.push(reason);
    }
    match guard {
        Some(guard) => {
            let change = guard.candidate - guard.serving;
            let within = change >= -options.guard_tolerance;
            accepted &= within;
            reasons.push(format!(
                "{} ({change:+.4}), {} the tolerance of {}",
                scores(guard),
                if within { "within" } else { "a regression beyond" },
                options.guard_tolerance
            ));
        }
        None if overlap.is_some() => {}
        None => reasons.push("no guard set configured (promotion.guard_dataset)".into()),
    }
    (accepted, reasons)
}

/// The trained folder and the models it was trained from, on the training
/// set's held-out queries: what its manifest records.
pub async fn heldout(
    scorer: &Scorer<'_>,
    role: Role,
    parent: &ModelChoice,
    folder: &std::path::Path,
    queries: &[LabelledQuery],
    knowledge: Vec<KnowledgeObject>,
) -> Result<super::manifest::HeldoutEvaluation> {
    let name = "held-out feedback";
    let (metric, parent_value, parent_metrics) =
        scorer.score(role, parent, "live", EvalKnowledge::Objects(knowledge.clone()), queries, name).await?;
    let trained = parent.with(role, folder);
    let (_, value, model) =
        scorer.score(role, &trained, "live", EvalKnowledge::Objects(knowledge), queries, name).await?;
    Ok(super::manifest::HeldoutEvaluation { metric: metric.into(), value, parent_value, model, parent: parent_metrics })
}

impl std::fmt::Display for GateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "promotion gate for {} {} (serving: {}): {}",
            self.role,
            self.candidate,
            self.serving,
            if self.accepted { "ACCEPTED" } else { "REFUSED" }
        )?;
        for reason in &self.reasons {
            writeln!(f, "  - {reason}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comparison(serving: f64, candidate: f64) -> Comparison {
        Comparison {
            set: "s".into(),
            queries: 10,
            metric: "recall@75".into(),
            serving,
            candidate,
            serving_metrics: RankingMetrics::default(),
            candidate_metrics: RankingMetrics::default(),
        }
    }

    #[test]
    fn the_gate_wants_a_gain_on_held_out_and_no_regression_on_the_guard() {
        let options = PromotionOptions { min_gain: 0.02, guard_tolerance: 0.01, ..Default::default() };
        let pass = |heldout: (f64, f64), guard: Option<(f64, f64)>| {
            let guard = guard.map(|(a, b)| comparison(a, b));
            verdict(&comparison(heldout.0, heldout.1), guard.as_ref(), None, &options).0
        };
        assert!(pass((0.50, 0.53), None));
        assert!(!pass((0.50, 0.51), None), "a gain below the margin");
        assert!(!pass((0.50, 0.40), None), "a loss");
        assert!(pass((0.50, 0.60), Some((0.70, 0.695))), "a guard loss within the tolerance");
        assert!(!pass((0.50, 0.60), Some((0.70, 0.68))), "a guard regression beyond it");
        let (_, reasons) = verdict(&comparison(0.5, 0.6), Some(&comparison(0.7, 0.68)), None, &options);
        assert!(reasons[1].contains("a regression beyond the tolerance of 0.01"), "{reasons:?}");
    }

    fn query(id: &str, context: &str, text: &str, relevant: &[&str]) -> LabelledQuery {
        LabelledQuery {
            id: id.into(),
            index: 0,
            query: text.into(),
            context: vec![crate::proto::ConversationTurn { speaker: 0, text: context.into() }],
            relevant: relevant.iter().map(|r| r.to_string()).collect(),
            judged_irrelevant: None,
            reference_reply: String::new(),
        }
    }

    #[test]
    fn a_guard_that_shares_a_training_question_refuses() {
        let options = PromotionOptions::default();
        let training = [query("t1", "About the Acorn", "Free wifi?", &["acorn:wifi"])];
        // Same question about another hotel; a different question about the same object.
        let disjoint = [
            query("g1", "About the Bridge", "Free wifi?", &["bridge:wifi"]),
            query("g2", "Acorn", "Wifi speed?", &["acorn:wifi"]),
        ];
        let overlap = GuardOverlap::between(&disjoint, &training);
        assert_eq!((overlap.shared_queries, overlap.shared_relevant), (0, 1));
        let (ok, reasons) = verdict(&comparison(0.5, 0.6), Some(&comparison(0.7, 0.7)), Some(&overlap), &options);
        assert!(ok && reasons[1].contains("shares no question") && reasons[1].contains("1 of 2"), "{reasons:?}");
        // The training question again, spaced and cased differently.
        let shared = [query("g3", "about the  acorn", "free WIFI?", &["acorn:wifi"]), disjoint[0].clone()];
        let overlap = GuardOverlap::between(&shared, &training);
        assert_eq!(overlap.shared_queries, 1);
        let (ok, reasons) = verdict(&comparison(0.5, 0.6), None, Some(&overlap), &options);
        assert!(!ok && reasons[1].contains("1 of 2 guard questions were trained on"), "{reasons:?}");
        assert_eq!(reasons.len(), 2, "an overlapping guard is not scored: {reasons:?}");
    }

    #[test]
    fn evenly_spaced_subsets() {
        let rows: Vec<usize> = (0..10).collect();
        assert_eq!(evenly(rows.clone(), 0), rows);
        assert_eq!(evenly(rows.clone(), 20), rows);
        assert_eq!(evenly(rows, 5), vec![0, 2, 4, 6, 8]);
    }
}
