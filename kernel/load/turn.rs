//! One turn of a load run: the calls one agent makes for one question, each
//! timed and recorded with its status.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use super::{LoadOptions, Pattern, Recorder, report::StreamTimes};
pub(super) use crate::worker::annotators::Dice;
use crate::{
    eval::dataset::LabelledQuery,
    proto::{
        self, Annotation, ConversationTurn, GenerateRequest, KnowledgeJudgement, RankRequest, RelevanceLabel,
        RequestContext, RetrieveRequest, SamplingParams, Speaker, SubmitAnnotationRequest, annotation, generate_event,
        generate_request, missing_knowledge, rank_request, support_service_client::SupportServiceClient,
    },
    remote::Remote,
};

/// Objects Retrieve returns and Rank receives, and objects Rank shows.
const RETRIEVE_K: u32 = 75;
const SHOWN: u32 = 8;

pub(super) struct Shared {
    pub channel: Remote,
    pub options: LoadOptions,
    pub recorder: Arc<Recorder>,
    /// Makes this run's annotation ids its own.
    pub run_id: String,
}

impl Dice {
    pub(super) fn new(seed: u64, stream: u64) -> Dice {
        let mut dice = Dice(seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
        dice.next();
        dice
    }

    /// Exponentially distributed with mean `mean`.
    fn exponential(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(-(1.0 - self.unit()).ln())
    }
}

impl Shared {
    /// The next turn's number, unless the bound on turns is reached.
    pub fn claim(&self) -> Option<u64> {
        let number = self.recorder.started.fetch_add(1, Ordering::Relaxed);
        self.options.max_turns.is_none_or(|max| number < max).then_some(number)
    }

    pub async fn think(&self, dice: &mut Dice) {
        if self.options.pattern == Pattern::Copilot && !self.options.think.is_zero() {
            tokio::time::sleep(dice.exponential(self.options.think)).await;
        }
    }

    fn client(&self) -> SupportServiceClient<Remote> {
        SupportServiceClient::new(self.channel.clone())
    }

    /// Runs turn `number` as agent `agent`.
    pub async fn turn(&self, agent: usize, number: u64, dice: &mut Dice) {
        let started = Instant::now();
        let measured = self.recorder.measures(started);
        if measured {
            self.recorder.measured_started.fetch_add(1, Ordering::Relaxed);
        }
        let query = &self.options.queries[(number as usize) % self.options.queries.len()];
        let agent_id = format!("load-agent-{agent}");
        match self.options.pattern {
            Pattern::Copilot => self.copilot(query, &agent_id, number, dice).await,
            Pattern::Retrieve => drop(self.retrieve(query, &agent_id).await),
            Pattern::Rank => self.rank_passages(query, &agent_id, dice).await,
            Pattern::Generate => drop(self.generate(query, &agent_id, None, number).await),
        }
        if measured {
            self.recorder.measured_finished.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn context(&self, agent_id: &str, query: &LabelledQuery) -> Option<RequestContext> {
        // No tenant named: the calls act for the key's (or the default).
        Some(RequestContext { agent_id: agent_id.into(), case_id: query.id.clone(), tenant: String::new() })
    }

    async fn retrieve(&self, query: &LabelledQuery, agent_id: &str) -> Option<proto::RetrieveResponse> {
        let request = RetrieveRequest {
            query: query.query.clone(),
            context: query.context.clone(),
            top_k: RETRIEVE_K,
            request_context: self.context(agent_id, query),
            ..Default::default()
        };
        let started = Instant::now();
        let answer = self.client().retrieve(request).await;
        self.recorder.record("Retrieve", started, answer.as_ref().map(drop));
        answer.ok().map(tonic::Response::into_inner)
    }

    async fn rank(&self, request: RankRequest) -> Option<proto::RankResponse> {
        let started = Instant::now();
        let answer = self.client().rank(request).await;
        self.recorder.record("Rank", started, answer.as_ref().map(drop));
        answer.ok().map(tonic::Response::into_inner)
    }

    async fn rank_passages(&self, query: &LabelledQuery, agent_id: &str, dice: &mut Dice) {
        let passages = &self.options.passages;
        let texts = (0..RETRIEVE_K).map(|_| passages[dice.below(passages.len())].clone()).collect();
        let request = RankRequest {
            query: query.query.clone(),
            context: query.context.clone(),
            candidates: Some(rank_request::Candidates::Passages(proto::Passages { texts })),
            top_n: SHOWN,
            request_context: self.context(agent_id, query),
        };
        self.rank(request).await;
    }

    /// GenerateStream, timed to its first delta and between each
    /// candidate's deltas; its interaction id and the candidates it finished.
    async fn generate(
        &self,
        query: &LabelledQuery,
        agent_id: &str,
        grounding: Option<String>,
        number: u64,
    ) -> Option<(String, Vec<proto::Candidate>)> {
        let mut conversation = query.context.clone();
        conversation.push(ConversationTurn { speaker: Speaker::Customer as i32, text: query.query.clone() });
        let request = GenerateRequest {
            conversation,
            grounding: grounding.map(generate_request::Grounding::GroundingInteractionId),
            num_candidates: self.options.candidates,
            sampling: Some(SamplingParams {
                temperature: 0.7,
                top_p: 0.95,
                seed: self.options.seed.wrapping_add(number).max(1),
                max_new_tokens: self.options.max_new_tokens,
                ..Default::default()
            }),
            request_context: self.context(agent_id, query),
            ..Default::default()
        };
        let started = Instant::now();
        let mut times = StreamTimes::default();
        let mut last_delta: std::collections::HashMap<String, Instant> = Default::default();
        let mut finished = Vec::new();
        let mut interaction = String::new();
        let outcome: Result<(), tonic::Status> = async {
            let mut stream = self.client().generate_stream(request).await?.into_inner();
            while let Some(event) = stream.message().await? {
                match event.event {
                    Some(generate_event::Event::Started(started)) => interaction = started.interaction_id,
                    Some(generate_event::Event::Delta(delta)) => {
                        let now = Instant::now();
                        times.first_delta.get_or_insert(now - started);
                        if let Some(last) = last_delta.insert(delta.candidate_id, now) {
                            times.gaps.push(now - last);
                        }
                    }
                    Some(generate_event::Event::Finished(candidate)) => {
                        times.tokens += u64::from(candidate.completion_tokens);
                        finished.push(candidate);
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        .await;
        times.total = started.elapsed();
        self.recorder.record("GenerateStream", started, outcome.as_ref().map(|_| ()));
        if outcome.is_ok() {
            self.recorder.stream(started, times);
        }
        outcome.ok().map(|()| (interaction, finished))
    }

    async fn annotate(&self, annotation: Annotation, shown_at: SystemTime) {
        let annotation =
            Annotation { shown_at: Some(shown_at.into()), annotated_at: Some(SystemTime::now().into()), ..annotation };
        let started = Instant::now();
        let answer = self.client().submit_annotation(SubmitAnnotationRequest { annotation: Some(annotation) }).await;
        self.recorder.record("SubmitAnnotation", started, answer.as_ref().map(drop));
        if answer.is_ok() && self.recorder.measures(started) {
            self.recorder.annotations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Retrieve → Rank → GenerateStream → relevance, missing knowledge,
    /// preference and adoption; a failed call ends the turn, as an agent
    /// would stop at an error.
    async fn copilot(&self, query: &LabelledQuery, agent_id: &str, number: u64, dice: &mut Dice) {
        let Some(retrieved) = self.retrieve(query, agent_id).await else { return };
        self.think(dice).await;
        let request = RankRequest {
            query: query.query.clone(),
            context: query.context.clone(),
            candidates: Some(rank_request::Candidates::RetrieveInteractionId(retrieved.interaction_id.clone())),
            top_n: SHOWN,
            request_context: self.context(agent_id, query),
        };
        let Some(ranked) = self.rank(request).await else { return };
        let ranked_at = SystemTime::now();
        self.think(dice).await;
        let Some((generated, candidates)) =
            self.generate(query, agent_id, Some(ranked.interaction_id.clone()), number).await
        else {
            return;
        };
        let generated_at = SystemTime::now();
        self.think(dice).await;

        let base = |kind: &str, interaction: &str| Annotation {
            annotation_id: format!("load-{}-{number}-{kind}", self.run_id),
            interaction_id: interaction.into(),
            agent_id: agent_id.into(),
            case_id: query.id.clone(),
            ..Default::default()
        };
        let shown: Vec<String> = ranked
            .items
            .iter()
            .filter_map(|i| i.knowledge.as_ref()?.knowledge.as_ref())
            .map(|k| k.id.clone())
            .collect();
        let judgements = shown
            .iter()
            .map(|id| KnowledgeJudgement {
                knowledge_id: id.clone(),
                label: if query.relevant.contains(id) { RelevanceLabel::Relevant } else { RelevanceLabel::Irrelevant }
                    as i32,
            })
            .collect();
        let relevance = Annotation {
            kind: Some(annotation::Kind::Relevance(proto::KnowledgeRelevance { judgements })),
            ..base("relevance", &ranked.interaction_id)
        };
        self.annotate(relevance, ranked_at).await;
        // What the data set calls relevant and Rank did not show; else a source outside the knowledge base.
        let source = match query.relevant.iter().find(|id| !shown.contains(id)) {
            Some(id) => missing_knowledge::Source::KnowledgeId(id.clone()),
            None => missing_knowledge::Source::External(proto::ExternalReference {
                title: format!("load test reference for {}", query.id),
                uri: format!("aitl-load://{}/{number}", self.run_id),
                excerpt: String::new(),
            }),
        };
        let missing = Annotation {
            kind: Some(annotation::Kind::MissingKnowledge(proto::MissingKnowledge {
                source: Some(source),
                note: String::new(),
            })),
            ..base("missing", &ranked.interaction_id)
        };
        self.annotate(missing, ranked_at).await;
        let Some(first) = candidates.first() else { return };
        // A preference needs two candidates (--candidates 1 sends the adoption alone).
        if let Some(second) = candidates.get(1) {
            let preference = Annotation {
                kind: Some(annotation::Kind::Preference(proto::PairwisePreference {
                    preferred_candidate_id: first.candidate_id.clone(),
                    other_candidate_id: second.candidate_id.clone(),
                    strength: proto::PreferenceStrength::Better as i32,
                    rationale: "load test".into(),
                })),
                ..base("preference", &generated)
            };
            self.annotate(preference, generated_at).await;
        }
        let adoption = Annotation {
            kind: Some(annotation::Kind::Adoption(proto::Adoption {
                candidate_id: first.candidate_id.clone(),
                decision: proto::AdoptionDecision::AdoptedAsIs as i32,
                sent_text: String::new(),
                rationale: String::new(),
            })),
            ..base("adoption", &generated)
        };
        self.annotate(adoption, generated_at).await;
    }
}
