//! Generate and GenerateStream: the grounded prompt from the conversation and
//! the ranked knowledge, N candidates from one prefill on the decoding
//! engine, citations read back, and the interaction (with every candidate's
//! text) recorded before the caller gets the final answer.
//!
//! For the registry's share of requests with a challenger generator, half
//! of the candidates (at random positions) come from the challenger, each
//! naming its version, so agents' pairwise preferences are an online A/B
//! test.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Instant, SystemTime},
};

use tokio::sync::mpsc;

use super::AppState;
use crate::{
    engine::{
        GeneratorEngine,
        generator::{Finish, GenerateEvent as EngineEvent, GenerateJob},
        grounding,
        sampler::SamplingConfig,
    },
    error::{Error, Result},
    feedback::new_interaction_id,
    proto::{
        Candidate, FinishReason, GenerateEvent, GenerateRequest, GenerateResponse, InteractionKind, InteractionRecord,
        KnowledgeObject, ModelVersions, ScoredKnowledge, ShownKnowledge, Timings, generate_event,
        generate_request::Grounding, interaction_record,
    },
};

/// Grounding objects put in the prompt when a request leaves max_grounding at 0.
const DEFAULT_GROUNDING: usize = 8;
/// Candidates when a request leaves num_candidates at 0: the agent compares two.
const DEFAULT_CANDIDATES: usize = 2;

/// Sampling when a request sends none: varied enough that two candidates differ.
fn default_sampling() -> SamplingConfig {
    SamplingConfig { temperature: 0.7, top_k: 0, top_p: 0.95, repetition_penalty: 1.1, seed: 0 }
}

/// A request accepted by the engine, with what its response will carry.
pub(super) struct Generation {
    pub interaction_id: String,
    pub candidate_ids: Vec<String>,
    pub grounding: Vec<ScoredKnowledge>,
    pub models: ModelVersions,
    /// Per candidate: the generator writing it and its prompt's length.
    candidate_models: Vec<(String, usize)>,
    /// Where the champion decodes (the timings' device).
    device: String,
    pub started: Instant,
    /// When the last engine took the request from its queue.
    admitted: Option<Instant>,
    /// Engines still to report their admission.
    waiting: usize,
    pub request: GenerateRequest,
    /// The tenant the call acts for.
    tenant: String,
    events: mpsc::UnboundedReceiver<EngineEvent>,
}

/// A uniform draw in [0, 1): SipHash with fresh random keys.
fn uniform() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Submits `candidates` (global positions) to `engine` and forwards its
/// events with those positions. The forwarder stops when the caller goes
/// away, which closes the engine's channel and frees the slots.
fn submit(
    engine: &GeneratorEngine,
    prompt: Vec<u32>,
    candidates: Vec<usize>,
    sampling: SamplingConfig,
    max_new_tokens: usize,
    stop: Vec<String>,
    merged: mpsc::UnboundedSender<EngineEvent>,
) -> Result<()> {
    let (events, mut from_engine) = mpsc::unbounded_channel();
    engine.submit(GenerateJob { prompt, candidates: candidates.len(), sampling, max_new_tokens, stop, events })?;
    tokio::spawn(async move {
        loop {
            // A caller that goes away closes `merged`; dropping `from_engine`
            // then tells the engine at once, even while the request still waits.
            let event = tokio::select! {
                event = from_engine.recv() => match event {
                    Some(event) => event,
                    None => break,
                },
                _ = merged.closed() => break,
            };
            let event = match event {
                EngineEvent::Delta { candidate, text } => EngineEvent::Delta { candidate: candidates[candidate], text },
                EngineEvent::Finished { candidate, text, finish, completion_tokens } => {
                    EngineEvent::Finished { candidate: candidates[candidate], text, finish, completion_tokens }
                }
                other => other,
            };
            if merged.send(event).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// The grounding objects in prompt order (exactly the versions a Rank or
/// Retrieve interaction showed, or the latest of each id).
async fn grounding_of(state: &AppState, tenant: &str, req: &GenerateRequest) -> Result<Vec<ScoredKnowledge>> {
    let limit = if req.max_grounding == 0 { DEFAULT_GROUNDING } else { req.max_grounding as usize };
    let (field, wanted): (&'static str, Vec<(String, u64)>) = match &req.grounding {
        None => return Ok(Vec::new()),
        Some(Grounding::KnowledgeIds(ids)) => {
            ("knowledge_ids.ids", ids.ids.iter().take(limit).map(|id| (id.clone(), 0)).collect())
        }
        Some(Grounding::GroundingInteractionId(id)) => {
            let shown = state
                .interactions
                .get(tenant, id)
                .ok_or_else(|| Error::NotFound(format!("grounding_interaction_id: interaction {id:?} is unknown")))?;
            if !matches!(shown.kind, InteractionKind::Retrieve | InteractionKind::Rank) {
                return Err(Error::invalid("grounding_interaction_id", "must name a Retrieve or Rank interaction"));
            }
            ("grounding_interaction_id", shown.knowledge.iter().take(limit).cloned().collect())
        }
    };
    let objects = super::fetch_knowledge(&state.kb, tenant, field, wanted).await?;
    Ok(objects
        .into_iter()
        .enumerate()
        .map(|(i, knowledge)| ScoredKnowledge { knowledge: Some(knowledge), score: 0.0, rank: i as u32 + 1 })
        .collect())
}

pub(super) async fn start(state: &AppState, tenant: String, req: GenerateRequest) -> Result<Generation> {
    let started = Instant::now();
    let missing = || super::support::missing_model("Generate", "generator (decoder LLM)");
    let generators = state.generators.get().ok_or_else(missing)?;
    let champion = generators.champion.clone().ok_or_else(missing)?;
    let grounding = grounding_of(state, &tenant, &req).await?;
    let objects: Vec<KnowledgeObject> = grounding.iter().filter_map(|g| g.knowledge.clone()).collect();
    let system =
        if req.system_prompt.trim().is_empty() { grounding::DEFAULT_SYSTEM_PROMPT } else { &req.system_prompt };
    let messages = grounding::messages(system, &objects, &req.conversation);
    let sampling_params = req.sampling.clone().unwrap_or_default();
    let max_new_tokens = match sampling_params.max_new_tokens {
        0 => state.default_max_new_tokens as usize,
        n => n as usize,
    };
    let mut sampling = match &req.sampling {
        None => default_sampling(),
        Some(s) => SamplingConfig {
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: s.top_p,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
        },
    };
    if sampling.seed == 0 {
        sampling.seed = uuid::Uuid::now_v7().as_u64_pair().1;
    }
    let candidates = if req.num_candidates == 0 { DEFAULT_CANDIDATES } else { req.num_candidates as usize };

    // Which engine writes which candidate: all the champion, or, for the
    // challenger's share, alternate positions starting at a random one.
    let mut engines: Vec<(&GeneratorEngine, Vec<usize>)> = vec![(&champion, (0..candidates).collect())];
    if let Some(challenger) =
        generators.challenger.as_ref().filter(|_| candidates >= 2 && uniform() < generators.challenger_share)
    {
        let first = usize::from(uniform() < 0.5);
        let (theirs, ours): (Vec<usize>, Vec<usize>) = (0..candidates).partition(|c| c % 2 == first);
        engines = vec![(&champion, ours), (challenger, theirs)];
    }
    // Rendering and tokenizing a long prompt is CPU work: off the async
    // threads, which must stay free for other calls and health checks.
    let tokenizers: Vec<_> = engines.iter().map(|(engine, _)| engine.tokenizer().clone()).collect();
    let encoded = tokio::task::spawn_blocking(move || {
        let as_refs: Vec<_> = messages.iter().map(|(role, text)| (*role, text.as_str())).collect();
        tokenizers.iter().map(|t| t.encode(&t.render(&as_refs))).collect::<Result<Vec<_>>>()
    })
    .await
    .map_err(|e| Error::Internal(format!("tokenizing the prompt: {e}")))??;
    let mut prompts = Vec::with_capacity(engines.len());
    for ((engine, _), prompt) in engines.iter().zip(encoded) {
        if prompt.len() + 1 >= engine.context() {
            return Err(Error::invalid(
                "conversation",
                format!(
                    "the prompt is {} tokens with its grounding; the generator {} has a context of {}: \
                     send fewer turns or less grounding",
                    prompt.len(),
                    engine.version(),
                    engine.context()
                ),
            ));
        }
        prompts.push(prompt);
    }

    let interaction_id = new_interaction_id();
    let candidate_ids = (0..candidates).map(|c| format!("{interaction_id}/c{c}")).collect();
    let mut candidate_models = vec![(String::new(), 0); candidates];
    let (merged, events) = mpsc::unbounded_channel();
    for (part, ((engine, positions), prompt)) in engines.iter().zip(prompts).enumerate() {
        for &c in positions {
            candidate_models[c] = (engine.version().to_string(), prompt.len());
        }
        let sampling = SamplingConfig {
            // Distinct streams per engine: candidate c of part p samples with seed + p·N + c.
            seed: sampling.seed.wrapping_add((part * candidates) as u64),
            ..sampling.clone()
        };
        let stop = sampling_params.stop.clone();
        submit(engine, prompt, positions.clone(), sampling, max_new_tokens, stop, merged.clone())?;
    }
    let models = ModelVersions { generator: champion.version().into(), ..Default::default() };
    Ok(Generation {
        interaction_id,
        candidate_ids,
        grounding,
        models,
        candidate_models,
        device: champion.device().to_string(),
        started,
        admitted: None,
        waiting: engines.len(),
        request: req,
        tenant,
        events,
    })
}

fn finish_reason(finish: Finish) -> FinishReason {
    match finish {
        Finish::Stop => FinishReason::Stop,
        Finish::Length => FinishReason::Length,
        Finish::StopSequence => FinishReason::StopSequence,
    }
}

impl Generation {
    /// The next engine event turned into what the API reports, and the
    /// finished candidate when one completed.
    pub(super) async fn next(&mut self) -> Option<Result<(generate_event::Event, Option<Candidate>)>> {
        let mut event = self.events.recv().await?;
        while let EngineEvent::Admitted = event {
            self.waiting = self.waiting.saturating_sub(1);
            if self.waiting == 0 {
                self.admitted = Some(Instant::now());
            }
            event = self.events.recv().await?;
        }
        Some(match event {
            EngineEvent::Delta { candidate, text } => Ok((
                generate_event::Event::Delta(generate_event::Delta {
                    candidate_id: self.candidate_ids[candidate].clone(),
                    text,
                }),
                None,
            )),
            EngineEvent::Finished { candidate, text, finish, completion_tokens } => {
                let ids: Vec<String> =
                    self.grounding.iter().filter_map(|g| g.knowledge.as_ref().map(|k| k.id.clone())).collect();
                let (model_version, prompt_tokens) = self.candidate_models[candidate].clone();
                let done = Candidate {
                    candidate_id: self.candidate_ids[candidate].clone(),
                    cited_knowledge_ids: grounding::citations(&text, &ids),
                    text,
                    finish_reason: finish_reason(finish) as i32,
                    prompt_tokens: prompt_tokens as u32,
                    completion_tokens: completion_tokens as u32,
                    model_version,
                };
                Ok((generate_event::Event::Finished(done.clone()), Some(done)))
            }
            EngineEvent::Failed(why) => Err(Error::Internal(format!("generation failed: {why}"))),
            EngineEvent::Admitted => unreachable!("admissions are consumed above"),
        })
    }

    /// The candidates of a cancelled stream that had not finished, with
    /// the text the client had been sent (`sent`, by candidate id).
    pub(super) fn cancelled(&self, done: &[Candidate], mut sent: HashMap<String, String>) -> Vec<Candidate> {
        let ids: Vec<String> =
            self.grounding.iter().filter_map(|g| g.knowledge.as_ref().map(|k| k.id.clone())).collect();
        (0..self.candidate_ids.len())
            .filter(|&c| done.iter().all(|d| d.candidate_id != self.candidate_ids[c]))
            .map(|c| {
                let text = sent.remove(&self.candidate_ids[c]).unwrap_or_default();
                let (model_version, prompt_tokens) = self.candidate_models[c].clone();
                Candidate {
                    candidate_id: self.candidate_ids[c].clone(),
                    cited_knowledge_ids: grounding::citations(&text, &ids),
                    text,
                    finish_reason: FinishReason::Cancelled as i32,
                    prompt_tokens: prompt_tokens as u32,
                    completion_tokens: 0,
                    model_version,
                }
            })
            .collect()
    }

    pub(super) fn started_event(&self) -> GenerateEvent {
        GenerateEvent {
            event: Some(generate_event::Event::Started(generate_event::Started {
                interaction_id: self.interaction_id.clone(),
                candidate_ids: self.candidate_ids.clone(),
                grounding: self.grounding.clone(),
                models: Some(self.models.clone()),
            })),
        }
    }

    /// Records the interaction with its candidates (in candidate order);
    /// returns the timings reported to the caller.
    pub(super) async fn record(
        &self,
        state: &AppState,
        mut candidates: Vec<Candidate>,
    ) -> Result<(Vec<Candidate>, Timings)> {
        candidates.sort_by_key(|c| self.candidate_ids.iter().position(|id| *id == c.candidate_id));
        let total = self.started.elapsed();
        // Queue: from arrival until the (last) decoding engine took the request; compute: the rest.
        let queue = self.admitted.map_or(total, |at| at.duration_since(self.started)).min(total);
        let timings = Timings {
            queue_ns: queue.as_nanos() as u64,
            compute_ns: (total - queue).as_nanos() as u64,
            total_ns: total.as_nanos() as u64,
            device: self.device.clone(),
        };
        let record = InteractionRecord {
            interaction_id: self.interaction_id.clone(),
            kind: InteractionKind::Generate as i32,
            // When the request arrived: a stream shows candidates before
            // they are all done, and annotations may not predate this.
            created_at: Some((SystemTime::now() - total).into()),
            request_context: self.request.request_context.clone(),
            shown_knowledge: self
                .grounding
                .iter()
                .filter_map(|g| {
                    g.knowledge.as_ref().map(|k| ShownKnowledge {
                        knowledge_id: k.id.clone(),
                        version: k.version,
                        score: g.score,
                        rank: g.rank,
                    })
                })
                .collect(),
            candidates: candidates.clone(),
            models: Some(self.models.clone()),
            timings: Some(timings.clone()),
            request: Some(interaction_record::Request::Generate(self.request.clone())),
            tenant: self.tenant.clone(),
            ..Default::default()
        };
        state.interactions.record(record).await?;
        Ok((candidates, timings))
    }
}

/// Generate: waits for every candidate, records, answers.
pub(super) async fn unary(state: Arc<AppState>, tenant: String, req: GenerateRequest) -> Result<GenerateResponse> {
    let mut generation = start(&state, tenant, req).await?;
    let mut done = Vec::new();
    while done.len() < generation.candidate_ids.len() {
        match generation.next().await {
            Some(Ok((_, Some(candidate)))) => done.push(candidate),
            Some(Ok((_, None))) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(Error::Unavailable("the decoding worker stopped mid-request".into())),
        }
    }
    let (candidates, timings) = generation.record(&state, done).await?;
    Ok(GenerateResponse {
        interaction_id: generation.interaction_id.clone(),
        candidates,
        grounding: generation.grounding.clone(),
        models: Some(generation.models.clone()),
        timings: Some(timings),
    })
}
