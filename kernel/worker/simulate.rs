//! Simulated agents (`aitl simulate --dataset dstc11`): drives a running
//! server over gRPC the way live traffic would, in time order over the data
//! set's history part: Retrieve (top 75) → Rank (top 8 shown) → Generate (two
//! candidates, for a configurable share of questions) → annotations. The
//! agents know the data set's labels:
//! - careful agents label each shown object relevant or not from the labels,
//!   report the relevant objects retrieval missed as missing knowledge, prefer
//!   the candidate closer to the reference reply, adopt it when it is close
//!   and otherwise send the reference reply as their edit;
//! - careless agents answer at random, fast, with boilerplate rationales;
//! - fatigue turns a careful agent careless after a number of annotations;
//! - a share of missing-knowledge reports can be made late.
//!
//! It sends nothing but what real clients send. Which annotations were made
//! carelessly goes to a truth file beside, so the judge can be scored.

use std::{
    collections::HashSet,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tonic::transport::Channel;

use super::text;
pub use super::truth::Truth;
use crate::{
    error::{Error, Result},
    eval::dstc11::{self, LabelledQuery, Split},
    proto::{
        self, AdoptionDecision, Annotation, GenerateRequest, KnowledgeJudgement, RankRequest, RelevanceLabel,
        RequestContext, RetrieveRequest, SamplingParams, Speaker, SubmitAnnotationRequest, annotation,
        generate_request, missing_knowledge, rank_request, support_service_client::SupportServiceClient,
    },
};

#[derive(Debug, Clone)]
pub struct SimulationOptions {
    pub server: String,
    pub dataset: PathBuf,
    pub agents: usize,
    /// Share of agents who answer at random.
    pub careless_share: f64,
    /// Share of questions that also go through Generate (decoding is the slow part on a CPU).
    pub generate_share: f64,
    pub max_new_tokens: u32,
    /// Share of missing-knowledge reports made an hour late.
    pub late_missing_share: f64,
    /// A careful agent turns careless after this many annotations.
    pub fatigue_after: Option<usize>,
    /// Only the first this many history questions.
    pub limit: Option<usize>,
    pub seed: u64,
    pub truth: PathBuf,
}

#[derive(Debug, Default, Serialize)]
pub struct SimulationReport {
    pub questions: usize,
    pub generated: usize,
    pub annotations: usize,
    pub careless_annotations: usize,
    pub seconds: f64,
}

/// SplitMix64: a small deterministic generator; same seed, same simulation.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn failed<'a>(what: &'a str, id: &'a str) -> impl Fn(tonic::Status) -> Error + 'a {
    move |s| Error::Unavailable(format!("{what} for {id}: {}: {}", s.code(), s.message()))
}

const CARELESS_RATIONALES: &[&str] = &["ok", "fine", "", "good", "better"];

struct Agent {
    id: String,
    careless: bool,
    annotations: usize,
}

struct Simulator<'a> {
    client: SupportServiceClient<Channel>,
    options: &'a SimulationOptions,
    dice: Dice,
    truth: Truth,
    report: SimulationReport,
}

impl Simulator<'_> {
    async fn submit(
        &mut self,
        agent: &mut Agent,
        careless: bool,
        delay_s: f64,
        a: Annotation,
        kind: &str,
    ) -> Result<()> {
        let now = SystemTime::now();
        let annotation = Annotation {
            agent_id: agent.id.clone(),
            shown_at: Some((now - Duration::from_secs_f64(delay_s)).into()),
            annotated_at: Some(now.into()),
            ..a
        };
        let id = annotation.annotation_id.clone();
        self.client
            .submit_annotation(SubmitAnnotationRequest { annotation: Some(annotation) })
            .await
            .map_err(failed("SubmitAnnotation", &id))?;
        agent.annotations += 1;
        self.truth.annotations += 1;
        *self.truth.by_kind.entry(kind.into()).or_insert(0) += 1;
        if careless {
            self.truth.careless_annotations.insert(id);
            self.report.careless_annotations += 1;
        }
        self.report.annotations += 1;
        Ok(())
    }

    async fn question(&mut self, q: &LabelledQuery, agent: &mut Agent) -> Result<()> {
        let careless = agent.careless || self.options.fatigue_after.is_some_and(|n| agent.annotations >= n);
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
        let retrieved_ids: Vec<String> =
            retrieved.results.iter().filter_map(|r| r.knowledge.as_ref().map(|k| k.id.clone())).collect();
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
        let shown: Vec<String> = ranked
            .items
            .iter()
            .filter_map(|i| i.knowledge.as_ref()?.knowledge.as_ref().map(|k| k.id.clone()))
            .collect();
        let relevant: HashSet<&str> = q.relevant.iter().map(String::as_str).collect();
        let base = |id: String, interaction: &str| Annotation {
            annotation_id: id,
            interaction_id: interaction.to_string(),
            case_id: q.id.clone(),
            ..Default::default()
        };

        // Relevance of what Rank showed.
        let labels = [RelevanceLabel::Relevant, RelevanceLabel::PartiallyRelevant, RelevanceLabel::Irrelevant];
        let judgements: Vec<KnowledgeJudgement> = shown
            .iter()
            .map(|id| {
                let label = if careless {
                    labels[self.dice.below(3)]
                } else if relevant.contains(id.as_str()) {
                    RelevanceLabel::Relevant
                } else {
                    RelevanceLabel::Irrelevant
                };
                KnowledgeJudgement { knowledge_id: id.clone(), label: label as i32 }
            })
            .collect();
        if !judgements.is_empty() {
            let delay = if careless {
                0.2 * judgements.len() as f64
            } else {
                1.5 * judgements.len() as f64 + 5.0 * self.dice.unit()
            };
            let a = Annotation {
                kind: Some(annotation::Kind::Relevance(proto::KnowledgeRelevance { judgements })),
                ..base(format!("sim-{}-relevance", q.id), &ranked.interaction_id)
            };
            self.submit(agent, careless, delay, a, "relevance").await?;
        }

        // Missing knowledge: what retrieval did not find (careless agents name something shown).
        let missing: Vec<String> = if careless {
            if self.dice.unit() < 0.3 && !shown.is_empty() {
                vec![shown[self.dice.below(shown.len())].clone()]
            } else {
                Vec::new()
            }
        } else {
            q.relevant.iter().filter(|id| !retrieved_ids.contains(id)).cloned().collect()
        };
        for (n, id) in missing.into_iter().enumerate() {
            let late = self.dice.unit() < self.options.late_missing_share;
            let delay = if late { 3_600.0 } else { 5.0 + 15.0 * self.dice.unit() };
            let a = Annotation {
                kind: Some(annotation::Kind::MissingKnowledge(proto::MissingKnowledge {
                    source: Some(missing_knowledge::Source::KnowledgeId(id)),
                    note: String::new(),
                })),
                // On the Rank interaction: the agent reports it while checking what was shown.
                ..base(format!("sim-{}-missing-{n}", q.id), &ranked.interaction_id)
            };
            self.submit(agent, careless, delay, a, "missing_knowledge").await?;
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
        let (sa, sb) = (text::similarity(&a.text, &q.reference_reply), text::similarity(&b.text, &q.reference_reply));
        let (mut best, mut other, mut best_sim) = if sa >= sb { (a, b, sa) } else { (b, a, sb) };
        if careless && self.dice.unit() < 0.5 {
            (best, other, best_sim) = (other, best, 0.0);
        }
        let words: Vec<String> = text::words(&q.query).take(6).collect();
        let rationale = if careless {
            CARELESS_RATIONALES[self.dice.below(CARELESS_RATIONALES.len())].to_string()
        } else {
            format!("closer to what the customer asked about: {}", words.join(" "))
        };
        let delay = if careless { 1.0 } else { 8.0 + 10.0 * self.dice.unit() };
        let preference = Annotation {
            kind: Some(annotation::Kind::Preference(proto::PairwisePreference {
                preferred_candidate_id: best.candidate_id.clone(),
                other_candidate_id: other.candidate_id.clone(),
                strength: proto::PreferenceStrength::Better as i32,
                rationale,
            })),
            ..base(format!("sim-{}-preference", q.id), &generated.interaction_id)
        };
        self.submit(agent, careless, delay, preference, "preference").await?;
        let adoption = if careless {
            // Sends one of the two at random, whatever it preferred.
            let sent = if self.dice.unit() < 0.5 { best } else { other };
            proto::Adoption {
                candidate_id: sent.candidate_id.clone(),
                decision: AdoptionDecision::AdoptedAsIs as i32,
                sent_text: String::new(),
                rationale: String::new(),
            }
        } else if best_sim >= 0.6 {
            proto::Adoption {
                candidate_id: best.candidate_id.clone(),
                decision: AdoptionDecision::AdoptedAsIs as i32,
                sent_text: String::new(),
                rationale: String::new(),
            }
        } else {
            proto::Adoption {
                candidate_id: best.candidate_id.clone(),
                decision: AdoptionDecision::Edited as i32,
                sent_text: q.reference_reply.clone(),
                rationale: format!("rewrote the reply around {}", words.join(" ")),
            }
        };
        let adoption = Annotation {
            kind: Some(annotation::Kind::Adoption(adoption)),
            ..base(format!("sim-{}-adoption", q.id), &generated.interaction_id)
        };
        self.submit(agent, careless, delay + 20.0, adoption, "adoption").await
    }
}

/// Runs the simulation against `options.server`; writes the truth file.
pub async fn run(options: &SimulationOptions) -> Result<SimulationReport> {
    let started = Instant::now();
    let mut queries = dstc11::read_queries(&options.dataset, Split::History)?;
    if let Some(limit) = options.limit {
        queries.truncate(limit);
    }
    let channel = Channel::from_shared(options.server.clone())
        .map_err(|e| Error::InvalidArgument(format!("--server {}: {e}", options.server)))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach the server at {}: {e}", options.server)))?;
    let careless_agents = (options.agents as f64 * options.careless_share).round() as usize;
    let mut agents: Vec<Agent> = (0..options.agents.max(1))
        .map(|i| Agent { id: format!("sim-agent-{i:02}"), careless: i < careless_agents, annotations: 0 })
        .collect();
    let mut sim = Simulator {
        client: SupportServiceClient::new(channel),
        options,
        dice: Dice(options.seed),
        truth: Truth {
            careless_agents: agents.iter().filter(|a| a.careless).map(|a| a.id.clone()).collect(),
            ..Truth::default()
        },
        report: SimulationReport::default(),
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
