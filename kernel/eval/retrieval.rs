//! `aitl eval retrieval`: a labelled data set's queries through the real
//! Retrieve RPC (an in-process server on loopback over a scratch data dir
//! that keeps the data set's knowledge base and vectors between runs), then
//! the top 75 of each through Rank, scored before and after ranking. The
//! promotion gate runs the same evaluation on agents' held-out labels over
//! the live knowledge base.

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
    config::Config,
    error::{Error, Result},
    kb::{self, KnowledgeStore},
    proto::{
        KnowledgeFilter, KnowledgeObject, RankRequest, RetrieveRequest, rank_request::Candidates,
        support_service_client::SupportServiceClient,
    },
};

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

/// Evaluates the labelled data set in `dir` (BEIR layout or DSTC11
/// folder): `split`'s queries, and for the held-out split also the subset
/// whose relevant objects no history query touched.
pub async fn run_dataset(
    config: &Config,
    dir: &Path,
    split: Split,
    context_turns: usize,
    rank: bool,
) -> Result<RetrievalReport> {
    let set = dataset::open(dir)?;
    let queries = set.split(split);
    let subsets = match split {
        Split::Eval => vec![(UNSEEN_RELEVANT.to_string(), set.unseen_relevant().into_iter().map(|q| q.id).collect())],
        _ => Vec::new(),
    };
    let eval_set = EvalSet {
        name: &scratch_name(dir),
        knowledge: EvalKnowledge::Dataset(dir.to_owned()),
        queries: &queries,
        split: format!("{} {} split", dataset_label(dir), split.name()),
        subsets,
    };
    run(config, eval_set, context_turns, rank).await
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

/// Runs `set`'s queries through Retrieve (and Rank) of an in-process server
/// with `config`'s models.
pub async fn run(config: &Config, set: EvalSet<'_>, context_turns: usize, rank: bool) -> Result<RetrievalReport> {
    let queries = set.queries;
    let mut eval_config = config.clone();
    eval_config.data_dir = config.data_dir.join("eval").join(set.name);
    eval_config.models.cache_dir = config.model_cache();
    // Retrieval and ranking need no decoder.
    eval_config.models.generator = "none".into();
    eval_config.listen = "127.0.0.1:0".parse().expect("literal address");
    eval_config.retrieve.context_turns = context_turns;
    if eval_config.embedder_dir()?.is_none() {
        return Err(Error::InvalidArgument("retrieval evaluation needs an embedding model (models.embedder)".into()));
    }
    prepare_knowledge(&eval_config, set.knowledge)?;
    let server = crate::server::start(eval_config).await?;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .map_err(|e| Error::Internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("eval server: {e}")))?;
    let client = SupportServiceClient::new(channel);
    let rank = rank && server.state.ranker.get().is_some();
    let top_k = *metrics::RECALL_AT.iter().max().expect("non-empty") as u32;
    let results: Vec<Result<Answered>> = futures_util::stream::iter(queries.iter())
        .map(|q: &LabelledQuery| {
            let mut client = client.clone();
            async move {
                let failed = |s: tonic::Status| Error::Internal(format!("{}: {s}", q.id));
                let request =
                    RetrieveRequest { query: q.query.clone(), context: q.context.clone(), top_k, ..Default::default() };
                let started = Instant::now();
                let answer = client.retrieve(request).await.map_err(failed)?.into_inner();
                let retrieve_ms = started.elapsed().as_secs_f64() * 1e3;
                let retrieved = answer.results.into_iter().filter_map(|r| r.knowledge.map(|k| k.id)).collect();
                let embedder = answer.models.map(|m| m.embedder).unwrap_or_default();
                let ranked = if rank {
                    let request = RankRequest {
                        query: q.query.clone(),
                        context: q.context.clone(),
                        candidates: Some(Candidates::RetrieveInteractionId(answer.interaction_id)),
                        ..Default::default()
                    };
                    let started = Instant::now();
                    let answer = client.rank(request).await.map_err(failed)?.into_inner();
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
    server.shutdown().await?;
    let mut scores = Vec::with_capacity(queries.len());
    let mut ranked_scores = Vec::with_capacity(queries.len());
    let mut latencies = Vec::with_capacity(queries.len());
    let mut rank_latencies = Vec::with_capacity(queries.len());
    let (mut embedder, mut ranker) = (String::new(), String::new());
    for (query, result) in queries.iter().zip(results) {
        let answered = result?;
        let relevant: HashSet<&str> = query.relevant.iter().map(String::as_str).collect();
        let ranked: Vec<&str> = answered.retrieved.iter().map(String::as_str).collect();
        scores.push(metrics::score_query(&ranked, &relevant));
        latencies.push(answered.retrieve_ms);
        embedder = answered.embedder;
        if let Some((ids, ms, version)) = &answered.ranked {
            let reordered: Vec<&str> = ids.iter().map(String::as_str).collect();
            ranked_scores.push(metrics::score_query(&reordered, &relevant));
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
        split: set.split,
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

/// The knowledge in the scratch knowledge base (objects it no longer has
/// deleted), with vectors.
fn prepare_knowledge(config: &Config, knowledge: EvalKnowledge) -> Result<()> {
    let objects = match knowledge {
        EvalKnowledge::Dataset(dir) => dataset::read_corpus_of(&dir)?,
        EvalKnowledge::Objects(objects) => objects.into_iter().filter(|o| !o.deleted).collect(),
    };
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error::Internal(format!("{}: {e}", config.data_dir.display())))?;
    let store = KnowledgeStore::open(&config.knowledge_path())?;
    for chunk in objects.chunks(crate::api::convert::MAX_ITEMS) {
        store.upsert_batch(chunk.to_vec())?;
    }
    let wanted: HashSet<&str> = objects.iter().map(|o| o.id.as_str()).collect();
    for id in all_ids(&store)? {
        if !wanted.contains(id.as_str()) {
            store.delete(&id)?;
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

/// Ids of every live object of `store`.
fn all_ids(store: &KnowledgeStore) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list(after.as_deref(), 1_000, &KnowledgeFilter::default(), false)?;
        ids.extend(page.objects.into_iter().map(|o| o.id));
        match page.next_after {
            Some(next) => after = Some(next),
            None => return Ok(ids),
        }
    }
}

impl std::fmt::Display for RetrievalReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.metrics;
        writeln!(
            f,
            "retrieval on {}: {} queries, embedder {}, {} context turns",
            self.split, m.queries, self.embedder, self.context_turns
        )?;
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
