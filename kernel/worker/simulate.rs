//! Simulated agents (`aitl simulate --dataset DIR`, any labelled data set of
//! `eval::dataset`): drives a running server over gRPC the way live traffic
//! would, in time order over the data set's history split (the guard's
//! questions left out, for the promotion gate): Retrieve (top 75) → Rank (top 8 shown) → Generate (two
//! candidates, for a configurable share of questions) → annotations: the
//! relevance of the shown objects, missing-knowledge reports, a preference
//! between the candidates and an adoption.
//!
//! What each agent sends is decided by its annotator model
//! (`annotators.rs`: careful, random, position-biased, fatigued, ...), mixed
//! over the agents by `--annotators`. The simulator gathers what an agent
//! sees — the shown objects with their entities, the data set's labels,
//! the relevant objects retrieval missed (looked up with GetKnowledge, and
//! their same-entity look-alikes from the retrieved objects or ListKnowledge),
//! the candidates and the reference reply — and submits what the model
//! returns. It sends nothing but what real clients send. Which model each
//! agent follows and which annotations are wrong, and why, go to a truth
//! file beside (`truth.rs`), so the judge can be scored.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use super::annotators::{self, Annotator, AnnotatorMix, Candidate, Dice, Made, Missing, Model, Question, Shown};
use super::text;
pub use super::truth::Truth;
use crate::{
    error::{Error, Result},
    eval::dataset::{self, LabelledQuery, Split},
    proto::{
        self, Annotation, GenerateRequest, GetKnowledgeRequest, KnowledgeFilter, KnowledgeJudgement, KnowledgeObject,
        ListKnowledgeRequest, RankRequest, RequestContext, RetrieveRequest, SamplingParams, Speaker,
        SubmitAnnotationRequest, annotation, generate_request, knowledge_service_client::KnowledgeServiceClient,
        missing_knowledge, rank_request, support_service_client::SupportServiceClient,
    },
    remote::Remote,
};

#[derive(Debug, Clone)]
pub struct SimulationOptions {
    pub server: String,
    pub dataset: PathBuf,
    pub agents: usize,
    /// Share of agents who answer at random (the `random` model's share in the mix).
    pub careless_share: f64,
    /// Share of questions that also go through Generate (decoding is the slow part on a CPU).
    pub generate_share: f64,
    pub max_new_tokens: u32,
    /// Share of missing-knowledge reports made an hour late by agents of
    /// models other than `late_missing` (timing only: they stay right).
    pub late_missing_share: f64,
    /// A careful agent decides at random after this many annotations (fault `fatigue`).
    pub fatigue_after: Option<usize>,
    /// Only the first this many history questions.
    pub limit: Option<usize>,
    pub seed: u64,
    pub truth: PathBuf,
    /// Annotator models over the agents (besides `careless_share`), their rates, the fatigue shift.
    pub annotators: AnnotatorMix,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ModelReport {
    pub agents: usize,
    pub annotations: usize,
    /// Wrong annotations by kind (relevance, missing_knowledge, preference, adoption).
    pub wrong: BTreeMap<String, usize>,
}

#[derive(Debug, Default, Serialize)]
pub struct SimulationReport {
    pub questions: usize,
    pub generated: usize,
    pub annotations: usize,
    /// Wrong annotations, all models together.
    pub careless_annotations: usize,
    pub seconds: f64,
    /// Per annotator model, by name.
    pub models: BTreeMap<String, ModelReport>,
}

impl std::fmt::Display for SimulationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "simulation: {} questions ({} generated), {} annotations, {} wrong, {:.1} s",
            self.questions, self.generated, self.annotations, self.careless_annotations, self.seconds
        )?;
        const KINDS: [&str; 4] = ["relevance", "missing_knowledge", "preference", "adoption"];
        writeln!(
            f,
            "| model | agents | annotations | wrong relevance | wrong missing | wrong preference | wrong adoption |"
        )?;
        writeln!(f, "| --- | --- | --- | --- | --- | --- | --- |")?;
        for (model, r) in &self.models {
            write!(f, "| {model} | {} | {} |", r.agents, r.annotations)?;
            for kind in KINDS {
                write!(f, " {} |", r.wrong.get(kind).copied().unwrap_or(0))?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn failed<'a>(what: &'a str, id: &'a str) -> impl Fn(tonic::Status) -> Error + 'a {
    move |s| Error::from_status(format!("{what} for {id}"), &s)
}

struct Agent {
    id: String,
    annotator: Annotator,
}

fn entity(object: &KnowledgeObject) -> Option<String> {
    annotators::entity_key(&object.title, &object.metadata)
}

struct Simulator<'a> {
    client: SupportServiceClient<Remote>,
    knowledge: KnowledgeServiceClient<Remote>,
    options: &'a SimulationOptions,
    /// Which questions go through Generate (the agents have dice of their own).
    dice: Dice,
    truth: Truth,
    report: SimulationReport,
}

impl Simulator<'_> {
    async fn submit<T>(&mut self, agent: &Agent, made: &Made<T>, a: Annotation, kind: &str) -> Result<()> {
        let now = SystemTime::now();
        let annotation = Annotation {
            agent_id: agent.id.clone(),
            shown_at: Some((now - Duration::from_secs_f64(made.delay_s)).into()),
            annotated_at: Some(now.into()),
            ..a
        };
        let id = annotation.annotation_id.clone();
        self.client
            .submit_annotation(SubmitAnnotationRequest { annotation: Some(annotation) })
            .await
            .map_err(failed("SubmitAnnotation", &id))?;
        self.truth.annotations += 1;
        *self.truth.by_kind.entry(kind.into()).or_insert(0) += 1;
        let model = self.report.models.entry(agent.annotator.model().name().into()).or_default();
        model.annotations += 1;
        if let Some(fault) = made.fault {
            self.truth.wrong(&id, fault);
            *model.wrong.entry(kind.into()).or_insert(0) += 1;
            self.report.careless_annotations += 1;
        }
        self.report.annotations += 1;
        Ok(())
    }

    /// The relevant objects retrieval missed, each with the objects about
    /// its entity that are not relevant (from what was retrieved; else, for
    /// an agent who may name one, from ListKnowledge).
    async fn missing(
        &mut self,
        q: &LabelledQuery,
        retrieved: &[KnowledgeObject],
        wants_look_alikes: bool,
    ) -> Result<(Vec<Missing>, Vec<Option<String>>)> {
        let mut missing = Vec::new();
        let mut entities = Vec::new();
        for id in q.relevant.iter().filter(|id| !retrieved.iter().any(|k| &k.id == *id)) {
            let object = match self
                .knowledge
                .get_knowledge(GetKnowledgeRequest { id: id.clone(), ..Default::default() })
                .await
            {
                Ok(object) => Some(object.into_inner()),
                Err(s) if s.code() == tonic::Code::NotFound => None,
                Err(s) => return Err(failed("GetKnowledge", &q.id)(s)),
            };
            let key = object.as_ref().and_then(entity);
            let not_relevant = |k: &&KnowledgeObject| !q.relevant.contains(&k.id);
            let mut look_alikes: Vec<String> = retrieved
                .iter()
                .filter(not_relevant)
                .filter(|k| key.is_some() && entity(k) == key)
                .map(|k| k.id.clone())
                .collect();
            let needs_listing = look_alikes.is_empty() && wants_look_alikes;
            if let Some(object) = object.as_ref().filter(|o| needs_listing && o.metadata.contains_key("entity_id")) {
                let metadata: HashMap<String, String> = ["domain", "entity_id"]
                    .iter()
                    .filter_map(|k| object.metadata.get(*k).map(|v| (k.to_string(), v.clone())))
                    .collect();
                let listed = self
                    .knowledge
                    .list_knowledge(ListKnowledgeRequest {
                        page_size: 100,
                        filter: Some(KnowledgeFilter { metadata, ..Default::default() }),
                        ..Default::default()
                    })
                    .await
                    .map_err(failed("ListKnowledge", &q.id))?
                    .into_inner();
                look_alikes = listed.objects.iter().filter(not_relevant).map(|k| k.id.clone()).collect();
            }
            missing.push(Missing { id: id.clone(), look_alikes });
            entities.push(key);
        }
        Ok((missing, entities))
    }

    async fn question(&mut self, q: &LabelledQuery, agent: &mut Agent) -> Result<()> {
        let context = Some(RequestContext { agent_id: agent.id.clone(), case_id: q.id.clone(), tenant: String::new() });
        let retrieved = self
            .client
            .retrieve(RetrieveRequest {
                query: q.query.clone(),
                context: q.context.clone(),
                top_k: 75,
                request_context: context.clone(),
                ..Default::default()
            })
            .await
            .map_err(failed("Retrieve", &q.id))?
            .into_inner();
        let retrieved_objects: Vec<KnowledgeObject> =
            retrieved.results.iter().filter_map(|r| r.knowledge.clone()).collect();
        let ranked = self
            .client
            .rank(RankRequest {
                query: q.query.clone(),
                context: q.context.clone(),
                candidates: Some(rank_request::Candidates::RetrieveInteractionId(retrieved.interaction_id.clone())),
                top_n: 8,
                request_context: context.clone(),
            })
            .await
            .map_err(failed("Rank", &q.id))?
            .into_inner();
        let relevant: HashSet<&str> = q.relevant.iter().map(String::as_str).collect();
        let shown: Vec<Shown> = ranked
            .items
            .iter()
            .filter_map(|i| i.knowledge.as_ref()?.knowledge.as_ref())
            .map(|k| Shown { id: k.id.clone(), entity: entity(k), relevant: relevant.contains(k.id.as_str()) })
            .collect();
        let wants_look_alikes = agent.annotator.model() == Model::LateMissing;
        let (missing, missing_entities) = self.missing(q, &retrieved_objects, wants_look_alikes).await?;
        let relevant_entities: HashSet<String> = retrieved_objects
            .iter()
            .filter(|k| relevant.contains(k.id.as_str()))
            .filter_map(entity)
            .chain(missing_entities.into_iter().flatten())
            .collect();
        let query_words: Vec<String> = text::words(&q.query).take(6).collect();
        let question = Question {
            shown: &shown,
            relevant_entities: &relevant_entities,
            missing: &missing,
            query_words: &query_words,
            reference_reply: &q.reference_reply,
        };
        let base = |id: String, interaction: &str| Annotation {
            annotation_id: id,
            interaction_id: interaction.to_string(),
            case_id: q.id.clone(),
            ..Default::default()
        };

        // Relevance of what Rank showed.
        if let Some(made) = agent.annotator.relevance(&question) {
            let judgements = made
                .value
                .iter()
                .map(|(id, label)| KnowledgeJudgement { knowledge_id: id.clone(), label: *label as i32 })
                .collect();
            let a = Annotation {
                kind: Some(annotation::Kind::Relevance(proto::KnowledgeRelevance { judgements })),
                ..base(format!("sim-{}-relevance", q.id), &ranked.interaction_id)
            };
            self.submit(agent, &made, a, "relevance").await?;
        }

        // Missing knowledge: what retrieval did not find.
        for (n, made) in agent.annotator.missing(&question).into_iter().enumerate() {
            let a = Annotation {
                kind: Some(annotation::Kind::MissingKnowledge(proto::MissingKnowledge {
                    source: Some(missing_knowledge::Source::KnowledgeId(made.value.clone())),
                    note: String::new(),
                })),
                // On the Rank interaction: the agent reports it while checking what was shown.
                ..base(format!("sim-{}-missing-{n}", q.id), &ranked.interaction_id)
            };
            self.submit(agent, &made, a, "missing_knowledge").await?;
        }

        if self.dice.unit() >= self.options.generate_share {
            return Ok(());
        }
        let mut conversation = q.context.clone();
        conversation.push(proto::ConversationTurn { speaker: Speaker::Customer as i32, text: q.query.clone() });
        let generated = self
            .client
            .generate(GenerateRequest {
                conversation,
                grounding: Some(generate_request::Grounding::GroundingInteractionId(ranked.interaction_id.clone())),
                num_candidates: 2,
                sampling: Some(SamplingParams {
                    temperature: 0.7,
                    top_p: 0.95,
                    repetition_penalty: 1.1,
                    seed: self.options.seed.wrapping_add(q.index as u64),
                    max_new_tokens: self.options.max_new_tokens,
                    ..Default::default()
                }),
                request_context: context,
                ..Default::default()
            })
            .await
            .map_err(failed("Generate", &q.id))?
            .into_inner();
        self.report.generated += 1;
        let [a, b] = &generated.candidates[..] else { return Ok(()) };
        let candidate = |c: &proto::Candidate| Candidate {
            id: c.candidate_id.clone(),
            similarity: text::similarity(&c.text, &q.reference_reply),
        };
        let (preference, adoption) = agent.annotator.reply(&question, &candidate(a), &candidate(b));
        let p = &preference.value;
        let a = Annotation {
            kind: Some(annotation::Kind::Preference(proto::PairwisePreference {
                preferred_candidate_id: p.preferred.clone(),
                other_candidate_id: p.other.clone(),
                strength: proto::PreferenceStrength::Better as i32,
                rationale: p.rationale.clone(),
            })),
            ..base(format!("sim-{}-preference", q.id), &generated.interaction_id)
        };
        self.submit(agent, &preference, a, "preference").await?;
        let d = &adoption.value;
        let a = Annotation {
            kind: Some(annotation::Kind::Adoption(proto::Adoption {
                candidate_id: d.candidate.clone(),
                decision: d.decision as i32,
                sent_text: d.sent_text.clone(),
                rationale: d.rationale.clone(),
            })),
            ..base(format!("sim-{}-adoption", q.id), &generated.interaction_id)
        };
        self.submit(agent, &adoption, a, "adoption").await
    }
}

/// Each agent's seed: the simulation's, spread by the agent's index.
fn agent_seed(seed: u64, index: usize) -> u64 {
    Dice(seed ^ (index as u64).wrapping_mul(0xd1b5_4a32_d192_ed03)).next()
}

/// Runs the simulation against `options.server`; writes the truth file.
pub async fn run(options: &SimulationOptions) -> Result<SimulationReport> {
    let started = Instant::now();
    let mix = options.annotators.clone().with_careless(options.careless_share)?;
    let mut queries = dataset::read_queries(&options.dataset, Split::History)?;
    if let Some(limit) = options.limit {
        queries.truncate(limit);
    }
    let channel = crate::remote::connect(&options.server, "--server").await?;
    let mut agents: Vec<Agent> = mix
        .assign(options.agents.max(1))
        .into_iter()
        .enumerate()
        .map(|(i, model)| Agent {
            id: format!("sim-agent-{i:02}"),
            annotator: Annotator::new(model, mix.rate(model), agent_seed(options.seed, i))
                .with_shift(mix.shift)
                .with_fatigue_after(options.fatigue_after)
                .with_late_share(options.late_missing_share),
        })
        .collect();
    let mut report = SimulationReport::default();
    for agent in &agents {
        report.models.entry(agent.annotator.model().name().into()).or_default().agents += 1;
    }
    let mut sim = Simulator {
        client: SupportServiceClient::new(channel.clone()),
        knowledge: KnowledgeServiceClient::new(channel),
        options,
        dice: Dice(options.seed),
        truth: Truth {
            careless_agents: agents
                .iter()
                .filter(|a| a.annotator.model() != Model::Careful)
                .map(|a| a.id.clone())
                .collect(),
            agent_models: agents.iter().map(|a| (a.id.clone(), a.annotator.model().name().to_string())).collect(),
            ..Truth::default()
        },
        report,
    };
    for (i, q) in queries.iter().enumerate() {
        let n = agents.len();
        sim.question(q, &mut agents[i % n]).await?;
        sim.report.questions += 1;
        if (i + 1) % 100 == 0 {
            tracing::info!(questions = i + 1, annotations = sim.report.annotations, "simulating agents");
        }
    }
    sim.report.seconds = started.elapsed().as_secs_f64();
    let truth = serde_json::to_vec_pretty(&sim.truth).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&options.truth, truth).map_err(|e| Error::Internal(format!("{}: {e}", options.truth.display())))?;
    Ok(sim.report)
}
