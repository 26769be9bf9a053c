//! `aitl demo flywheel`: one round of the flywheel from an empty data dir,
//! every stage through the real components: DSTC11's knowledge ingested
//! into a server on loopback; Retrieve and Rank scored on the held-out
//! queries; simulated agents working through the history questions over
//! gRPC; the worker judging their annotations; training sets exported;
//! retriever and ranker trained, gated and promoted into the running server
//! (which re-embeds the knowledge base and switches); the generator's LoRA
//! adapters trained with ORPO on the agents' preferences and adoptions, gated
//! and promoted (unless skipped); the held-out queries scored again.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    Worker, datasets,
    generator_gate::GeneratorGateReport,
    journal::Journal,
    round::{self, Trainer},
    simulate::{self, SimulationOptions, SimulationReport},
    train_generator::{self, GeneratorTraining},
    train_ranker::RankerTraining,
    train_retriever::RetrieverTraining,
};
use crate::{
    config::Config,
    error::{Error, Result},
    eval::{
        dataset::{self, Split},
        retrieval::{self, Evaluator, RetrievalReport},
    },
    kb::{KnowledgeStore, QueryComposition},
    registry::{Registry, Role, gate::GateReport},
    worker::datasets::KnowledgeSource,
};

#[derive(Clone)]
pub struct DemoOptions {
    pub dataset: PathBuf,
    pub agents: usize,
    pub careless_share: f64,
    /// Annotator models over the agents besides the careless share (`--annotators`).
    pub annotators: super::annotators::AnnotatorMix,
    /// The judge's verdicts filter the training sets (off: the ablation).
    pub judge: bool,
    pub generate_share: f64,
    /// Only the first this many history questions.
    pub limit: Option<usize>,
    pub seed: u64,
    pub retriever: RetrieverTraining,
    /// None: the ranker is not trained (the similarity ranker follows the retriever).
    pub ranker: Option<RankerTraining>,
    /// None: the generator is not trained (`--no-generator`).
    pub generator: Option<GeneratorTraining>,
}

#[derive(Debug, Serialize)]
pub struct Stage {
    pub stage: String,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub before: RetrievalReport,
    pub after: RetrievalReport,
    pub simulation: SimulationReport,
    pub training_set: datasets::Manifest,
    pub gates: Vec<GateReport>,
    pub generator_gate: Option<GeneratorGateReport>,
    pub promoted: Vec<String>,
    pub stages: Vec<Stage>,
}

/// Times each stage as it runs, and says what it is doing.
struct Clock {
    stages: Vec<Stage>,
}

impl Clock {
    async fn time<T>(&mut self, stage: &str, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        eprintln!("== {stage}");
        let started = Instant::now();
        let out = work.await?;
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("== {stage}: {seconds:.1} s");
        self.stages.push(Stage { stage: stage.into(), seconds });
        Ok(out)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("demo task: {e}")))?
}

/// Waits until the server serves `version` as `role` (a promoted retriever
/// first re-embeds the knowledge base).
async fn switched(server: &crate::server::RunningServer, role: Role, version: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3_600);
    loop {
        let status = server.state.serving.get().remove(&role).unwrap_or_default();
        if status.registry_version.as_deref() == Some(version) && status.switching_to.is_none() {
            return Ok(());
        }
        if let Some(why) = status.last_error.filter(|_| status.switching_to.is_none()) {
            return Err(Error::Internal(why));
        }
        if Instant::now() > deadline {
            return Err(Error::Unavailable(format!(
                "the server did not switch its {role} to {version} within an hour"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The data set's held-out split through a loopback server with `config`'s models.
async fn evaluate_dataset(config: &Config, dataset: &std::path::Path, turns: usize) -> Result<RetrievalReport> {
    let evaluator = crate::eval_server::LoopbackEvaluator::new(config);
    let eval = retrieval::DatasetEval::open(dataset, Split::Eval)?;
    evaluator.evaluate(&evaluator.configured(), &eval.set(), turns, true).await
}

pub async fn run(config: &Config, options: &DemoOptions) -> Result<DemoReport> {
    let mut clock = Clock { stages: Vec::new() };
    if config.log_dir().exists() {
        return Err(Error::AlreadyExists(format!(
            "{} already holds a training log: the demo starts from an empty data dir",
            config.data_dir.display()
        )));
    }
    let mut config = config.clone();
    config.listen = "127.0.0.1:0".parse().expect("literal address");
    // Simulated agents only; the demo's figures are about retrieval and ranking.
    config.judge.llm = "off".into();
    // Late reports are simulated by backdating `shown_at`, which the server
    // otherwise refuses as earlier than the interaction.
    let late = crate::worker::annotators::LATEST_REPORT_S as u64 + 600;
    config.annotations.max_clock_skew_s = config.annotations.max_clock_skew_s.max(late);
    // The data set's guard split (questions no simulated agent annotates)
    // guards the gate unless the config names a guard.
    if config.promotion.guard_dataset.as_os_str().is_empty() {
        config.promotion.guard_dataset = options.dataset.clone();
        config.promotion.guard_split = Split::Guard.name().into();
    }
    let turns = config.retrieve.context_turns;

    let (dataset, kb_path) = (options.dataset.clone(), config.knowledge_path());
    let data_dir = config.data_dir.clone();
    clock
        .time(
            "ingest the data set's knowledge",
            blocking(move || {
                std::fs::create_dir_all(&data_dir)
                    .map_err(|e| Error::Internal(format!("{}: {e}", data_dir.display())))?;
                let store = KnowledgeStore::open(&kb_path)?;
                for chunk in dataset::read_corpus_of(&dataset)?.chunks(crate::api::convert::MAX_ITEMS) {
                    store.upsert_batch(crate::tenancy::DEFAULT_TENANT, chunk.to_vec())?;
                }
                Ok(())
            }),
        )
        .await?;
    let server =
        clock.time("start the server (embeds the knowledge base)", crate::server::start(config.clone())).await?;
    let url = format!("http://{}", server.addr);

    let before =
        clock.time("score the held-out queries before", evaluate_dataset(&config, &options.dataset, turns)).await?;
    eprintln!("{before}");

    let simulation = SimulationOptions {
        server: url.clone(),
        dataset: options.dataset.clone(),
        agents: options.agents,
        careless_share: options.careless_share,
        generate_share: options.generate_share,
        max_new_tokens: 32,
        late_missing_share: 0.0,
        fatigue_after: None,
        limit: options.limit,
        seed: options.seed,
        truth: config.data_dir.join("truth.json"),
        annotators: options.annotators.clone(),
    };
    let simulation = clock.time("simulate agents over the history questions", simulate::run(&simulation)).await?;

    let mut judge = config.judge.clone();
    judge.enabled &= options.judge;
    let (worker_dir, log_dir) = (config.worker_dir(), config.log_dir());
    let report = clock
        .time(
            "worker: join and judge the annotations",
            blocking(move || Worker::open(&worker_dir, &log_dir, judge)?.run_once(&log_dir)),
        )
        .await?;
    eprintln!(
        "worker: {} annotations, {} verdicts ({} failed)",
        report.annotations, report.verdicts, report.failed_verdicts
    );

    let kb = server.state.kb.clone();
    let (worker_dir, datasets_dir) = (config.worker_dir(), config.datasets_dir());
    let judged = config.judge.enabled && options.judge;
    let (dataset_dir, training_set) = clock
        .time(
            "export the training sets",
            blocking(move || {
                let journal = Journal::open(&worker_dir)?;
                let sets = datasets::build(&journal, kb.as_ref(), QueryComposition { context_turns: turns }, judged)?;
                Ok((sets.export(&datasets_dir)?, sets.manifest))
            }),
        )
        .await?;

    let mut gates = Vec::new();
    let mut promoted = Vec::new();
    let mut trainers = vec![Trainer::Retriever(options.retriever.clone())];
    if let Some(ranker) = &options.ranker {
        trainers.push(Trainer::Ranker(ranker.clone(), None));
    }
    for trainer in trainers {
        let role = trainer.role();
        let kb = server.state.kb.clone();
        let knowledge = blocking(move || kb.live_objects()).await?;
        let progress = |step: usize, total: usize, loss: f32| {
            if step.is_multiple_of(10) || step == total {
                eprintln!("step {step}/{total} loss {loss:.4}");
            }
        };
        let trained = clock
            .time(
                &format!("train the {role}"),
                round::train(&config, &dataset_dir, None, trainer, knowledge.clone(), progress),
            )
            .await?;
        let promotion = clock
            .time(&format!("promotion gate for the {role}"), round::promote(&config, &trained.name, knowledge, false))
            .await?;
        if let Some(gate) = &promotion.gate {
            eprint!("{gate}");
        }
        gates.extend(promotion.gate);
        if promotion.promoted {
            clock.time(&format!("server switches its {role}"), switched(&server, role, &trained.name)).await?;
            promoted.push(trained.name);
        }
    }

    let mut generator_gate = None;
    if let Some(training) = &options.generator {
        match train_and_gate_generator(&config, &server, &dataset_dir, &training_set, training, &mut clock).await? {
            Some((gate, Some(version))) => {
                generator_gate = Some(gate);
                promoted.push(version);
            }
            Some((gate, None)) => generator_gate = Some(gate),
            None => eprintln!("== the export holds no preference pairs: the generator is not trained"),
        }
    }

    let serving = Registry::load(&config.data_dir)?.serving_config(&config);
    let after =
        clock.time("score the held-out queries after", evaluate_dataset(&serving, &options.dataset, turns)).await?;
    server.shutdown().await?;
    Ok(DemoReport { before, after, simulation, training_set, gates, generator_gate, promoted, stages: clock.stages })
}

/// ORPO on LoRA adapters over the serving generator, then its gate; the
/// gate's report and the promoted version's name when it passed. None when
/// the export has no preference pairs to train on.
async fn train_and_gate_generator(
    config: &Config,
    server: &crate::server::RunningServer,
    dataset_dir: &std::path::Path,
    training_set: &datasets::Manifest,
    training: &GeneratorTraining,
    clock: &mut Clock,
) -> Result<Option<(GeneratorGateReport, Option<String>)>> {
    let pairs = |split| datasets::read_rows::<datasets::GeneratorRow>(dataset_dir, split, "generator");
    let (train, heldout) = (pairs("train")?.len(), pairs("heldout")?.len());
    if train == 0 || heldout == 0 {
        return Ok(None);
    }
    let base = Registry::load(&config.data_dir)?
        .serving_config(config)
        .generator_path()?
        .ok_or_else(|| Error::FailedPrecondition("no generator serves: nothing to train adapters over".into()))?;
    let name = format!("generator-{}", training_set.version);
    let output = crate::registry::trained_dir(&config.data_dir).join(&name);
    let (training, dataset) = (training.clone(), dataset_dir.to_owned());
    clock
        .time(
            &format!("train the generator ({train} pairs, ORPO on LoRA)"),
            blocking(move || {
                let progress = |step: usize, total: usize, loss: f32| {
                    if step.is_multiple_of(10) || step == total {
                        eprintln!("step {step}/{total} loss {loss:.4}");
                    }
                };
                train_generator::train_from_export(&dataset, &base, &output, &training, progress)
            }),
        )
        .await?;
    let promotion =
        clock.time("promotion gate for the generator", round::promote(config, &name, Vec::new(), false)).await?;
    let gate = promotion.generator_gate.ok_or_else(|| Error::Internal("the generator gate did not run".into()))?;
    eprint!("{gate}");
    if !promotion.promoted {
        return Ok(Some((gate, None)));
    }
    clock.time("server switches its generator", switched(server, Role::Generator, &name)).await?;
    Ok(Some((gate, Some(name))))
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lift = |before: f64, after: f64| if before > 0.0 { (after / before - 1.0) * 100.0 } else { 0.0 };
        let r75 = |r: &RetrievalReport| r.metrics.recall_at(75).unwrap_or(0.0);
        let p8 = |r: &RetrievalReport| r.ranked.as_ref().and_then(|m| m.metrics.precision_at(8)).unwrap_or(0.0);
        writeln!(f, "flywheel round on the {}: {} held-out queries", self.after.split, self.after.metrics.queries)?;
        writeln!(
            f,
            "simulation: {} questions, {} annotations ({} wrong, by the truth file); training set {}: {} rejected by the judge",
            self.simulation.questions,
            self.simulation.annotations,
            self.simulation.careless_annotations,
            self.training_set.version,
            self.training_set.rejected
        )?;
        writeln!(f, "| metric | before | after | lift |")?;
        writeln!(f, "| --- | --- | --- | --- |")?;
        let (b, a) = (r75(&self.before), r75(&self.after));
        writeln!(f, "| Recall@75 (Retrieve) | {b:.3} | {a:.3} | {:+.1}% |", lift(b, a))?;
        let (b, a) = (p8(&self.before), p8(&self.after));
        writeln!(f, "| Precision@8 (Retrieve 75, then Rank) | {b:.3} | {a:.3} | {:+.1}% |", lift(b, a))?;
        for (before, after) in self.before.subsets.iter().zip(&self.after.subsets) {
            let name = format!("{} {}", after.metrics.queries, after.name);
            let (b, a) = (before.metrics.recall_at(75).unwrap_or(0.0), after.metrics.recall_at(75).unwrap_or(0.0));
            writeln!(f, "| Recall@75, {name} | {b:.3} | {a:.3} | {:+.1}% |", lift(b, a))?;
            let p8 = |m: &Option<crate::eval::metrics::RankingMetrics>| {
                m.as_ref().and_then(|m| m.precision_at(8)).unwrap_or(0.0)
            };
            let (b, a) = (p8(&before.ranked), p8(&after.ranked));
            writeln!(f, "| Precision@8, {name} | {b:.3} | {a:.3} | {:+.1}% |", lift(b, a))?;
        }
        writeln!(
            f,
            "served before: {} / {}; after: {} / {}",
            self.before.embedder,
            self.before.ranked.as_ref().map_or("-", |r| r.ranker.as_str()),
            self.after.embedder,
            self.after.ranked.as_ref().map_or("-", |r| r.ranker.as_str())
        )?;
        for gate in &self.gates {
            write!(f, "{gate}")?;
        }
        if let Some(gate) = &self.generator_gate {
            write!(f, "{gate}")?;
        }
        writeln!(f, "| stage | wall time (s) |")?;
        writeln!(f, "| --- | --- |")?;
        for stage in &self.stages {
            writeln!(f, "| {} | {:.1} |", stage.stage, stage.seconds)?;
        }
        Ok(())
    }
}
