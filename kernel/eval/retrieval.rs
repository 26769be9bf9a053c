//! `aitl eval retrieval`: a labelled data set's queries through a server's
//! public Retrieve RPC, then the top 75 of each through Rank, scored before
//! and after ranking. This side is a plain gRPC client: it scores whatever
//! server it is given, a remote one (`--server`) or the loopback one an
//! [`Evaluator`] starts over a scratch data dir with the models under test
//! (`crate::eval_server`). The promotion gate runs the same evaluation on
//! agents' held-out labels over the live knowledge base.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Instant,
};

use futures_util::StreamExt;
use serde::Serialize;

use super::{
    dataset::{self, LabelledQuery, Split},
    metrics::{self, QueryScores, RankingMetrics},
};
use crate::{
    error::{Error, Result},
    proto::{
        GetServingModelsRequest, KnowledgeObject, RankRequest, RetrieveRequest,
        flywheel_service_client::FlywheelServiceClient, rank_request::Candidates,
        support_service_client::SupportServiceClient,
    },
};

/// The models one evaluation serves, as config values (a path, "default",
/// "similarity").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelChoice {
    pub embedder: String,
    pub ranker: String,
}

/// Runs evaluations with chosen models: the promotion gate compares a
/// candidate and the serving models through one of these.
#[tonic::async_trait]
pub trait Evaluator: Send + Sync {
    /// Scores `set` through a server that serves `models`, its queries
    /// composed with `context_turns` turns of context.
    async fn evaluate(
        &self,
        models: &ModelChoice,
        set: &EvalSet<'_>,
        context_turns: usize,
        rank: bool,
    ) -> Result<RetrievalReport>;
}

/// Where an evaluation's knowledge base comes from.
pub enum EvalKnowledge {
    /// A labelled data set's corpus (BEIR layout or DSTC11 folder).
    Dataset(PathBuf),
    /// These objects (a snapshot of the live knowledge base).
    Objects(Vec<KnowledgeObject>),
}

/// One evaluation: queries with relevance labels over a knowledge base.
pub struct EvalSet<'a> {
    /// Names the scratch data dir (`{data_dir}/eval/{name}`), which keeps
    /// the knowledge and its vectors for the next run.
    pub name: &'a str,
    pub knowledge: EvalKnowledge,
    pub queries: &'a [LabelledQuery],
    /// What the report calls the queries.
    pub split: String,
    /// Named subsets of `queries` (by id) reported beside all of them.
    pub subsets: Vec<(String, HashSet<String>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetrievalReport {
    pub split: String,
    /// Scored on condensed lists: the queries' labels are agents' judgements
    /// of what they were shown, and objects nobody judged were left out of
    /// each ranking before scoring ([`LabelledQuery::judged_only`]).
    pub condensed: bool,
    pub context_turns: usize,
    pub embedder: String,
    pub metrics: RankingMetrics,
    pub retrieve_p50_ms: f64,
    pub retrieve_p99_ms: f64,
    /// The same queries after Rank reordered the retrieved objects.
    pub ranked: Option<RankedReport>,
    /// The set's subsets, scored alike.
    pub subsets: Vec<SubsetReport>,
}

/// A subset of the evaluated queries, e.g. those whose relevant objects no
/// history query touched.
#[derive(Debug, Clone, Serialize)]
pub struct SubsetReport {
    pub name: String,
    pub metrics: RankingMetrics,
    pub ranked: Option<RankingMetrics>,
}

/// What the report calls the held-out queries none of whose relevant
/// objects was relevant in history.
pub const UNSEEN_RELEVANT: &str = "unseen relevant (no relevant object was relevant to a history query)";

#[derive(Debug, Clone, Serialize)]
pub struct RankedReport {
    pub ranker: String,
    pub metrics: RankingMetrics,
    pub rank_p50_ms: f64,
    pub rank_p99_ms: f64,
}

/// One query's answers: retrieved ids, ranked ids, latencies, versions.
struct Answered {
    retrieved: Vec<String>,
    retrieve_ms: f64,
    embedder: String,
    ranked: Option<(Vec<String>, f64, String)>,
}

/// Calls in flight at once.
const CONCURRENCY: usize = 8;

/// `split`'s queries of the labelled data set in `dir` (BEIR layout or
/// DSTC11 folder), over its corpus; for the held-out split with the subset
/// whose relevant objects no history query touched.
pub struct DatasetEval {
    pub name: String,
    pub dir: PathBuf,
    pub queries: Vec<LabelledQuery>,
    pub split: String,
    pub subsets: Vec<(String, HashSet<String>)>,
}

impl DatasetEval {
    pub fn open(dir: &Path, split: Split) -> Result<DatasetEval> {
        let set = dataset::open(dir)?;
        let subsets = match split {
            Split::Eval => {
                vec![(UNSEEN_RELEVANT.to_string(), set.unseen_relevant().into_iter().map(|q| q.id).collect())]
            }
            _ => Vec::new(),
        };
        Ok(DatasetEval {
            name: scratch_name(dir),
            dir: dir.to_owned(),
            queries: set.split(split),
            split: format!("{} {} split", dataset_label(dir), split.name()),
            subsets,
        })
    }

    pub fn set(&self) -> EvalSet<'_> {
        EvalSet {
            name: &self.name,
            knowledge: EvalKnowledge::Dataset(self.dir.clone()),
            queries: &self.queries,
            split: self.split.clone(),
            subsets: self.subsets.clone(),
        }
    }
}

/// The data set's name in reports: its folder's name.
pub fn dataset_label(dir: &Path) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.starts_with("dstc11") { "DSTC11".into() } else { name }
}

/// The scratch data dir's name for the data set in `dir`: DSTC11's keeps
/// the name it had before other data sets, so its stored vectors stay valid.
pub fn scratch_name(dir: &Path) -> String {
    let label = dataset_label(dir);
    if label == "DSTC11" {
        return "dstc11".into();
    }
    let clean: String = label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("dataset-{clean}")
}

/// Scores `set`'s queries through the server behind `channel` (its
/// knowledge base must hold the set's objects). The client sends each
/// query's last `context_turns` turns; the server combines at most its own
/// `retrieve.context_turns` of them.
pub async fn score(
    channel: crate::remote::Remote,
    set: &EvalSet<'_>,
    context_turns: usize,
    rank: bool,
) -> Result<RetrievalReport> {
    let queries = set.queries;
    let unreachable = |s: tonic::Status| Error::from_status("evaluation server: GetServingModels", &s);
    let serving = FlywheelServiceClient::new(channel.clone())
        .get_serving_models(GetServingModelsRequest {})
        .await
        .map_err(unreachable)?;
    let has_ranker = serving.into_inner().models.iter().any(|m| m.role == "ranker" && !m.version.is_empty());
    let rank = rank && has_ranker;
    let client = SupportServiceClient::new(channel);
    let top_k = *metrics::RECALL_AT.iter().max().expect("non-empty") as u32;
    // Owned queries: each call's future holds its own, so the stream is Send
    // for any caller (a borrowed one trips the compiler's higher-ranked
    // lifetime check behind an async trait).
    let results: Vec<Result<Answered>> = futures_util::stream::iter(queries.to_vec())
        .map(|q: LabelledQuery| {
            let mut client = client.clone();
            let context = q.context[q.context.len().saturating_sub(context_turns)..].to_vec();
            async move {
                let failed = |call: &'static str| {
                    let id = q.id.clone();
                    move |s: tonic::Status| Error::from_status(format!("{call} for query {id}"), &s)
                };
                let request =
                    RetrieveRequest { query: q.query.clone(), context: context.clone(), top_k, ..Default::default() };
                let started = Instant::now();
                let answer = client.retrieve(request).await.map_err(failed("Retrieve"))?.into_inner();
                let retrieve_ms = started.elapsed().as_secs_f64() * 1e3;
                let retrieved = answer.results.into_iter().filter_map(|r| r.knowledge.map(|k| k.id)).collect();
                let embedder = answer.models.map(|m| m.embedder).unwrap_or_default();
                let ranked = if rank {
                    let request = RankRequest {
                        query: q.query.clone(),
                        context,
                        candidates: Some(Candidates::RetrieveInteractionId(answer.interaction_id)),
                        ..Default::default()
                    };
                    let started = Instant::now();
                    let answer = client.rank(request).await.map_err(failed("Rank"))?.into_inner();
                    let ms = started.elapsed().as_secs_f64() * 1e3;
                    let ids = answer
                        .items
                        .into_iter()
                        .filter_map(|i| i.knowledge.and_then(|k| k.knowledge).map(|k| k.id))
                        .collect();
                    Some((ids, ms, answer.models.map(|m| m.ranker).unwrap_or_default()))
                } else {
                    None
                };
                Ok(Answered { retrieved, retrieve_ms, embedder, ranked })
            }
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    let mut scores = Vec::with_capacity(queries.len());
    let mut ranked_scores = Vec::with_capacity(queries.len());
    let mut latencies = Vec::with_capacity(queries.len());
    let mut rank_latencies = Vec::with_capacity(queries.len());
    let (mut embedder, mut ranker) = (String::new(), String::new());
    for (query, result) in queries.iter().zip(results) {
        let answered = result?;
        let relevant: HashSet<&str> = query.relevant.iter().map(String::as_str).collect();
        scores.push(metrics::score_query(&query.judged_only(&answered.retrieved), &relevant));
        latencies.push(answered.retrieve_ms);
        embedder = answered.embedder;
        if let Some((ids, ms, version)) = &answered.ranked {
            ranked_scores.push(metrics::score_query(&query.judged_only(ids), &relevant));
            rank_latencies.push(*ms);
            ranker.clone_from(version);
        }
    }
    let subsets = set
        .subsets
        .iter()
        .map(|(name, ids)| {
            let pick = |scores: &[QueryScores]| -> Vec<QueryScores> {
                queries.iter().zip(scores).filter(|(q, _)| ids.contains(&q.id)).map(|(_, s)| s.clone()).collect()
            };
            SubsetReport {
                name: name.clone(),
                metrics: metrics::average(&pick(&scores)),
                ranked: rank.then(|| metrics::average(&pick(&ranked_scores))),
            }
        })
        .collect();
    let (retrieve_p50_ms, retrieve_p99_ms) = percentiles(&mut latencies);
    let ranked = rank.then(|| {
        let (rank_p50_ms, rank_p99_ms) = percentiles(&mut rank_latencies);
        RankedReport { ranker, metrics: metrics::average(&ranked_scores), rank_p50_ms, rank_p99_ms }
    });
    Ok(RetrievalReport {
        split: set.split.clone(),
        condensed: queries.iter().any(|q| q.judged_irrelevant.is_some()),
        context_turns,
        embedder,
        metrics: metrics::average(&scores),
        retrieve_p50_ms,
        retrieve_p99_ms,
        ranked,
        subsets,
    })
}

/// (p50, p99) in place.
fn percentiles(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let pick = |p: f64| {
        values.get(((values.len() as f64 * p) as usize).min(values.len().saturating_sub(1))).copied().unwrap_or(0.0)
    };
    (pick(0.5), pick(0.99))
}

impl std::fmt::Display for RetrievalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.metrics;
        writeln!(
            f,
            "retrieval on {}: {} queries, embedder {}, {} context turns",
            self.split, m.queries, self.embedder, self.context_turns
        )?;
        if self.condensed {
            writeln!(f, "scored on condensed lists: objects no agent judged are left out of each ranking")?;
        }
        let columns = |m: &RankingMetrics| -> (Vec<String>, Vec<String>) {
            let header = m
                .recall
                .iter()
                .map(|(k, _)| format!("R@{k}"))
                .chain(m.precision.iter().map(|(k, _)| format!("P@{k}")))
                .chain(["nDCG@10".to_string(), "MRR".to_string()])
                .collect();
            let values = m
                .recall
                .iter()
                .chain(&m.precision)
                .map(|(_, v)| format!("{v:.3}"))
                .chain([format!("{:.3}", m.ndcg_at_10), format!("{:.3}", m.mrr)])
                .collect();
            (header, values)
        };
        let (header, values) = columns(m);
        writeln!(f, "| stage | {} |", header.join(" | "))?;
        writeln!(f, "| --- |{}", " --- |".repeat(header.len()))?;
        writeln!(f, "| retrieved | {} |", values.join(" | "))?;
        if let Some(ranked) = &self.ranked {
            writeln!(f, "| ranked | {} |", columns(&ranked.metrics).1.join(" | "))?;
        }
        for subset in &self.subsets {
            let n = subset.metrics.queries;
            writeln!(f, "| retrieved, {n} {} | {} |", subset.name, columns(&subset.metrics).1.join(" | "))?;
            if let Some(ranked) = &subset.ranked {
                writeln!(f, "| ranked, {n} {} | {} |", subset.name, columns(ranked).1.join(" | "))?;
            }
        }
        write!(
            f,
            "Retrieve over gRPC: p50 {:.2} ms, p99 {:.2} ms ({CONCURRENCY} in flight)",
            self.retrieve_p50_ms, self.retrieve_p99_ms
        )?;
        if let Some(ranked) = &self.ranked {
            write!(
                f,
                "\nranked: the top {} retrieved, reordered by Rank with {}; Rank over gRPC: p50 {:.2} ms, p99 {:.2} ms",
                metrics::RECALL_AT.iter().max().expect("non-empty"),
                ranked.ranker,
                ranked.rank_p50_ms,
                ranked.rank_p99_ms
            )?;
        }
        Ok(())
    }
}
