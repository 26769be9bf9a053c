//! `aitl load`: drives a running server over gRPC as a copilot's traffic
//! does, and reports per RPC what ghz would (count, rate, latency
//! percentiles and histogram with failed calls included, status codes),
//! plus Generate's time to first token, gaps between deltas and tokens/s.
//!
//! A *turn* is what one agent does for one customer question: in the
//! copilot pattern Retrieve (75) → Rank (8) → GenerateStream (2 candidates)
//! → the four annotations (relevance of what was shown, missing knowledge,
//! preference, adoption), with think times between the steps; in a
//! single-RPC pattern one call. Arrival is closed (N agents, each starting
//! its next turn when the last ended) or open (turns started at a fixed
//! rate, at most `max_in_flight` at once; the others are counted dropped).
//! Questions cycle through a labelled data set's history split.
//!
//! The annotations are real: they land in the server's training log under
//! agent ids `load-agent-N`, for the tenant the calls act for (the API key's
//! in `AITL_API_KEY`, else the default), so load a scratch data dir, not one
//! whose log trains models. A key bound to one agent refuses the other
//! agents' annotations: load with a key that names none.

pub mod report;
mod turn;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use report::{LoadReport, RpcReport, Samples};

use crate::{
    error::{Error, Result},
    eval::dataset::LabelledQuery,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Retrieve → Rank → GenerateStream → four annotations, with think times.
    Copilot,
    /// Retrieve (top 75) alone.
    Retrieve,
    /// Rank of 75 raw passages from the data set's corpus alone.
    Rank,
    /// GenerateStream without grounding alone.
    Generate,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Copilot => "copilot",
            Pattern::Retrieve => "retrieve",
            Pattern::Rank => "rank",
            Pattern::Generate => "generate",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// This many agents, each starting its next turn when the last ended.
    Closed { agents: usize },
    /// Turns started at `rate` per second, at most `max_in_flight` at once.
    Open { rate: f64, max_in_flight: usize },
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub server: String,
    pub pattern: Pattern,
    pub arrival: Arrival,
    /// Measured time, after the warm-up.
    pub duration: Duration,
    /// Turns started in this first stretch are run but not reported.
    pub warmup: Duration,
    /// At most this many turns in all (warm-up included); None: no bound.
    pub max_turns: Option<u64>,
    /// Mean think time before each copilot step after the first and after
    /// a turn (exponentially distributed); zero for none.
    pub think: Duration,
    pub candidates: u32,
    pub max_new_tokens: u32,
    /// The questions, cycled through.
    pub queries: Vec<LabelledQuery>,
    /// Passages for the rank pattern.
    pub passages: Vec<String>,
    pub seed: u64,
}

/// The RPCs in the order reports list them.
const RPCS: [&str; 4] = ["Retrieve", "Rank", "GenerateStream", "SubmitAnnotation"];

/// What the turns record into: samples of calls started after the warm-up.
struct Recorder {
    measured_from: Instant,
    samples: Mutex<std::collections::BTreeMap<&'static str, Samples>>,
    started: AtomicU64,
    measured_started: AtomicU64,
    measured_finished: AtomicU64,
    dropped: AtomicU64,
    annotations: AtomicU64,
}

impl Recorder {
    fn measures(&self, started: Instant) -> bool {
        started >= self.measured_from
    }

    fn record(&self, rpc: &'static str, started: Instant, status: std::result::Result<(), &tonic::Status>) {
        if self.measures(started) {
            let mut samples = self.samples.lock().expect("recorder lock");
            samples.entry(rpc).or_default().record(started.elapsed(), status);
        }
    }

    fn stream(&self, started: Instant, times: report::StreamTimes) {
        if self.measures(started) {
            self.samples.lock().expect("recorder lock").entry("GenerateStream").or_default().streams.push(times);
        }
    }
}

/// Runs the load and reports it.
pub async fn run(options: &LoadOptions) -> Result<LoadReport> {
    if options.queries.is_empty() {
        return Err(Error::InvalidArgument("load: the data set holds no questions to ask".into()));
    }
    if options.pattern == Pattern::Rank && options.passages.is_empty() {
        return Err(Error::InvalidArgument("load --pattern rank: the data set's corpus holds no passages".into()));
    }
    match options.arrival {
        Arrival::Closed { agents: 0 } => {
            return Err(Error::InvalidArgument("load --agents 0: closed arrival needs at least one agent".into()));
        }
        Arrival::Open { rate, .. } if !(rate > 0.0 && rate.is_finite()) => {
            return Err(Error::InvalidArgument(format!("load --rate {rate}: turns per second must be above 0")));
        }
        _ => {}
    }
    let channel = crate::remote::connect(&options.server, "load --server").await?;
    let begun = Instant::now();
    let recorder = Arc::new(Recorder {
        measured_from: begun + options.warmup,
        samples: Mutex::new(Default::default()),
        started: AtomicU64::new(0),
        measured_started: AtomicU64::new(0),
        measured_finished: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        annotations: AtomicU64::new(0),
    });
    let deadline = begun + options.warmup + options.duration;
    // Annotation ids must not repeat across runs against one server's log.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let run_id = format!("{:x}", options.seed ^ u64::from(std::process::id()) ^ now.as_nanos() as u64);
    let shared = Arc::new(turn::Shared { channel, options: options.clone(), recorder: recorder.clone(), run_id });
    let mut tasks = tokio::task::JoinSet::new();
    match options.arrival {
        Arrival::Closed { agents } => {
            for agent in 0..agents {
                let shared = shared.clone();
                tasks.spawn(async move {
                    let mut dice = turn::Dice::new(shared.options.seed, agent as u64);
                    while Instant::now() < deadline {
                        let Some(number) = shared.claim() else { break };
                        shared.turn(agent, number, &mut dice).await;
                        shared.think(&mut dice).await;
                    }
                });
            }
        }
        Arrival::Open { rate, max_in_flight } => {
            let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut offered = 0u64;
            loop {
                let tick = ticks.tick().await.into_std();
                if tick >= deadline {
                    break;
                }
                offered += 1;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    if recorder.measures(tick) {
                        recorder.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                };
                let Some(number) = shared.claim() else { break };
                let shared = shared.clone();
                tasks.spawn(async move {
                    let mut dice = turn::Dice::new(shared.options.seed, number);
                    shared.turn((offered % 64) as usize, number, &mut dice).await;
                    drop(permit);
                });
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        joined.map_err(|e| Error::Internal(format!("load: a turn's task failed: {e}")))?;
    }
    let window = Instant::now().saturating_duration_since(recorder.measured_from);
    let samples = recorder.samples.lock().expect("recorder lock");
    let rpcs: Vec<RpcReport> =
        RPCS.iter().filter_map(|name| samples.get(name).map(|s| RpcReport::of(name, s, window))).collect();
    let seconds = window.as_secs_f64().max(1e-9);
    let finished = recorder.measured_finished.load(Ordering::Relaxed);
    Ok(LoadReport {
        date: prost_types::Timestamp::from(std::time::SystemTime::now()).to_string(),
        pattern: options.pattern.name().into(),
        arrival: match options.arrival {
            Arrival::Closed { agents } => format!("closed: {agents} agents"),
            Arrival::Open { rate, max_in_flight } => format!("open: {rate} turns/s, at most {max_in_flight} in flight"),
        },
        total: window.as_nanos() as u64,
        turns_started: recorder.measured_started.load(Ordering::Relaxed),
        turns_finished: finished,
        offered_rate: match options.arrival {
            Arrival::Open { rate, .. } => Some(rate),
            Arrival::Closed { .. } => None,
        },
        achieved_rate: finished as f64 / seconds,
        turns_dropped: recorder.dropped.load(Ordering::Relaxed),
        annotations_per_second: recorder.annotations.load(Ordering::Relaxed) as f64 / seconds,
        rpcs,
    })
}
