//! SupportService: the copilot calls and agents' feedback. Until a model
//! engine is loaded, Retrieve, Rank and Generate validate their input (and
//! the ids it refers to) and answer UNAVAILABLE naming the missing model.
//! Every served call is recorded as an interaction before it is answered.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    time::{Instant, SystemTime},
};

use prost::Message;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{AppState, blocking, convert};
use crate::{
    engine::ranker::Passage,
    error::{Error, Result},
    feedback::new_interaction_id,
    kb::KbError,
    proto::{
        GenerateEvent, GenerateRequest, GenerateResponse, InteractionKind, InteractionRecord, KnowledgeObject,
        ModelVersions, RankRequest, RankResponse, RankedItem, RetrieveRequest, RetrieveResponse, ScoredKnowledge,
        ShownKnowledge, SubmitAnnotationRequest, SubmitAnnotationResponse, Timings, generate_event,
        generate_request::Grounding, interaction_record, rank_request::Candidates,
        support_service_server::SupportService,
    },
    tenancy,
};

pub struct Support {
    state: Arc<AppState>,
}

impl Support {
    pub fn new(state: Arc<AppState>) -> Self {
        Support { state }
    }

    fn check_knowledge_exist(&self, tenant: &str, field: &str, ids: &[String]) -> Result<()> {
        for (i, id) in ids.iter().enumerate() {
            self.state.kb.get(tenant, id, 0, false).map_err(|e| match e {
                KbError::NotFound(_) | KbError::Deleted { .. } => Error::NotFound(format!("{field}[{i}]: {e}")),
                other => other.into(),
            })?;
        }
        Ok(())
    }

    fn check_interaction(&self, tenant: &str, field: &str, id: &str, kinds: &[InteractionKind]) -> Result<()> {
        let shown = self
            .state
            .interactions
            .get(tenant, id)
            .ok_or_else(|| Error::NotFound(format!("{field}: interaction {id:?} is unknown to this server")))?;
        if !kinds.contains(&shown.kind) {
            return Err(Error::invalid(
                field,
                format!("interaction {id:?} is a {:?} interaction; expected {kinds:?}", shown.kind),
            ));
        }
        Ok(())
    }

    /// Embeds the question with its recent context, searches the index, and
    /// records the interaction (durably) before answering.
    async fn retrieve_knowledge(&self, tenant: String, req: RetrieveRequest) -> Result<RetrieveResponse> {
        let started = Instant::now();
        convert::check_retrieve(&req)?;
        let semantic = self.state.semantic.get().ok_or_else(|| missing_model("Retrieve", "embedding model"))?;
        let k = if req.top_k == 0 { self.state.default_top_k } else { req.top_k } as usize;
        let text = self.state.query_composition.compose(&req.query, &req.context);
        let (hits, embed) = semantic.search(&tenant, &text, k, &req.filter.clone().unwrap_or_default()).await?;
        let (kb, owner) = (self.state.kb.clone(), tenant.clone());
        let wanted: Vec<(String, u64)> = hits.iter().map(|h| (h.id.clone(), h.version)).collect();
        // The exact version the index scored, even if it changed since.
        let objects: Vec<KnowledgeObject> =
            blocking(move || wanted.iter().map(|(id, v)| Ok(kb.get(&owner, id, *v, true)?)).collect()).await?;
        let results: Vec<ScoredKnowledge> = objects
            .into_iter()
            .zip(&hits)
            .enumerate()
            .map(|(i, (knowledge, hit))| ScoredKnowledge {
                knowledge: Some(knowledge),
                score: hit.score,
                rank: i as u32 + 1,
            })
            .collect();
        let models = ModelVersions { embedder: semantic.model_version().into(), ..Default::default() };
        let timings = Timings {
            queue_ns: embed.queue.as_nanos() as u64,
            compute_ns: embed.compute.as_nanos() as u64,
            total_ns: started.elapsed().as_nanos() as u64,
            device: semantic.engine().device().label(),
        };
        let interaction_id = new_interaction_id();
        let response = RetrieveResponse {
            interaction_id: interaction_id.clone(),
            results,
            models: Some(models.clone()),
            timings: Some(timings.clone()),
        };
        super::check_response_fits(
            "Retrieve",
            response.encoded_len(),
            self.state.max_message_bytes,
            "ask for fewer results (top_k)",
        )?;
        let record = InteractionRecord {
            interaction_id: interaction_id.clone(),
            kind: InteractionKind::Retrieve as i32,
            created_at: Some(SystemTime::now().into()),
            request_context: req.request_context.clone(),
            shown_knowledge: shown(&response.results),
            models: Some(models),
            timings: Some(timings),
            request: Some(interaction_record::Request::Retrieve(req)),
            tenant,
            ..Default::default()
        };
        self.state.interactions.record(record).await?;
        Ok(response)
    }

    /// What a Rank request asks to score: knowledge objects (the latest
    /// version of each id, or exactly what a Retrieve interaction showed,
    /// even if changed or deleted since), or raw passages (no object).
    async fn rank_candidates_of(
        &self,
        tenant: &str,
        req: &RankRequest,
    ) -> Result<Vec<(Option<KnowledgeObject>, String)>> {
        let (field, wanted): (&'static str, Vec<(String, u64)>) = match &req.candidates {
            Some(Candidates::Passages(p)) => return Ok(p.texts.iter().map(|t| (None, t.clone())).collect()),
            Some(Candidates::KnowledgeIds(ids)) => {
                ("knowledge_ids.ids", ids.ids.iter().map(|id| (id.clone(), 0)).collect())
            }
            Some(Candidates::RetrieveInteractionId(id)) => {
                self.check_interaction(tenant, "retrieve_interaction_id", id, &[InteractionKind::Retrieve])?;
                let shown = self
                    .state
                    .interactions
                    .get(tenant, id)
                    .ok_or_else(|| Error::NotFound(format!("interaction {id}")))?;
                ("retrieve_interaction_id", shown.knowledge.clone())
            }
            None => return Err(Error::invalid("candidates", "is required")),
        };
        let objects = super::fetch_knowledge(&self.state.kb, tenant, field, wanted).await?;
        Ok(objects
            .into_iter()
            .map(|o| {
                let text = o.text.clone();
                (Some(o), text)
            })
            .collect())
    }

    /// Scores the candidates against the question (with its recent context),
    /// orders them, and records the interaction before answering.
    async fn rank_candidates(&self, tenant: String, req: RankRequest) -> Result<RankResponse> {
        let started = Instant::now();
        convert::check_rank(&req)?;
        super::check_request_loggable("Rank", req.encoded_len())?;
        let candidates = self.rank_candidates_of(&tenant, &req).await?;
        let ranker = self
            .state
            .ranker
            .get()
            .ok_or_else(|| missing_model("Rank", "ranker (cross-encoder, or an embedding model for similarity)"))?;
        let query = self.state.query_composition.compose(&req.query, &req.context);
        let passages: Vec<Passage> = candidates
            .iter()
            .map(|(object, text)| Passage { text, knowledge: object.as_ref().map(|o| (o.id.as_str(), o.version)) })
            .collect();
        let (scores, encode) = ranker.score(&tenant, &query, &passages).await?;
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        // Stable: equal scores keep the order they were given in.
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let keep = if req.top_n == 0 { order.len() } else { (req.top_n as usize).min(order.len()) };
        let mut candidates: Vec<Option<(Option<KnowledgeObject>, String)>> = candidates.into_iter().map(Some).collect();
        let items: Vec<RankedItem> = order[..keep]
            .iter()
            .enumerate()
            .map(|(position, &i)| {
                let (object, _) = candidates[i].take().expect("each index once");
                let (rank, score) = (position as u32 + 1, scores[i]);
                match object {
                    Some(knowledge) => RankedItem {
                        knowledge: Some(ScoredKnowledge { knowledge: Some(knowledge), score, rank }),
                        passage_index: 0,
                        score,
                        rank,
                    },
                    None => RankedItem { knowledge: None, passage_index: i as u32, score, rank },
                }
            })
            .collect();
        let models = ModelVersions {
            ranker: ranker.version().into(),
            embedder: ranker.embedder_version().unwrap_or_default().into(),
            ..Default::default()
        };
        let timings = Timings {
            queue_ns: encode.queue.as_nanos() as u64,
            compute_ns: encode.compute.as_nanos() as u64,
            total_ns: started.elapsed().as_nanos() as u64,
            device: ranker.device().label(),
        };
        let shown_results: Vec<ScoredKnowledge> = items.iter().filter_map(|item| item.knowledge.clone()).collect();
        let interaction_id = new_interaction_id();
        let response = RankResponse {
            interaction_id: interaction_id.clone(),
            items,
            models: Some(models.clone()),
            timings: Some(timings.clone()),
        };
        super::check_response_fits(
            "Rank",
            response.encoded_len(),
            self.state.max_message_bytes,
            "ask for fewer items (top_n)",
        )?;
        let record = InteractionRecord {
            interaction_id: interaction_id.clone(),
            kind: InteractionKind::Rank as i32,
            created_at: Some(SystemTime::now().into()),
            request_context: req.request_context.clone(),
            shown_knowledge: shown(&shown_results),
            models: Some(models),
            timings: Some(timings),
            request: Some(interaction_record::Request::Rank(req)),
            tenant,
            ..Default::default()
        };
        self.state.interactions.record(record).await?;
        Ok(response)
    }

    fn check_generate(&self, tenant: &str, req: &GenerateRequest) -> Result<()> {
        convert::check_generate(req)?;
        match &req.grounding {
            Some(Grounding::KnowledgeIds(ids)) => self.check_knowledge_exist(tenant, "knowledge_ids.ids", &ids.ids)?,
            Some(Grounding::GroundingInteractionId(id)) => self.check_interaction(
                tenant,
                "grounding_interaction_id",
                id,
                &[InteractionKind::Retrieve, InteractionKind::Rank],
            )?,
            None => {}
        }
        Ok(())
    }
}

/// What an interaction showed, by reference (id and version).
fn shown(results: &[ScoredKnowledge]) -> Vec<ShownKnowledge> {
    results
        .iter()
        .filter_map(|r| {
            r.knowledge.as_ref().map(|k| ShownKnowledge {
                knowledge_id: k.id.clone(),
                version: k.version,
                score: r.score,
                rank: r.rank,
            })
        })
        .collect()
}

/// The tenant a call acts for, once its `request_context.tenant` agrees.
fn declared_tenant<T>(request: &Request<T>, context: Option<&crate::proto::RequestContext>) -> Result<String> {
    if let Some(context) = context {
        tenancy::check_declared(request, "request_context.tenant", &context.tenant)?;
    }
    Ok(tenancy::of(request))
}

pub(super) fn missing_model(call: &str, model: &str) -> Error {
    Error::Unavailable(format!(
        "{call} needs a {model} and none is loaded in this server; configure one and restart, then retry"
    ))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SupportService for Support {
    async fn retrieve(&self, request: Request<RetrieveRequest>) -> Result<Response<RetrieveResponse>, Status> {
        let tenant = declared_tenant(&request, request.get_ref().request_context.as_ref())?;
        Ok(Response::new(self.retrieve_knowledge(tenant, request.into_inner()).await?))
    }

    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        let tenant = declared_tenant(&request, request.get_ref().request_context.as_ref())?;
        Ok(Response::new(self.rank_candidates(tenant, request.into_inner()).await?))
    }

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        let tenant = declared_tenant(&request, request.get_ref().request_context.as_ref())?;
        self.check_generate(&tenant, request.get_ref())?;
        Ok(Response::new(super::generate::unary(self.state.clone(), tenant, request.into_inner()).await?))
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(&self, request: Request<GenerateRequest>) -> Result<Response<EventStream>, Status> {
        let tenant = declared_tenant(&request, request.get_ref().request_context.as_ref())?;
        self.check_generate(&tenant, request.get_ref())?;
        let mut generation = super::generate::start(&self.state, tenant, request.into_inner()).await?;
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<GenerateEvent, Status>>(64);
        tokio::spawn(async move {
            if tx.send(Ok(generation.started_event())).await.is_err() {
                return;
            }
            let mut done = Vec::new();
            // What each unfinished candidate has sent so far, by id.
            let mut sent: HashMap<String, String> = HashMap::new();
            while done.len() < generation.candidate_ids.len() {
                let (event, finished, delta) = match generation.next().await {
                    Some(Ok((event, finished))) => {
                        let delta = match &event {
                            generate_event::Event::Delta(d) => Some((d.candidate_id.clone(), d.text.clone())),
                            _ => None,
                        };
                        (Ok(GenerateEvent { event: Some(event) }), finished, delta)
                    }
                    Some(Err(e)) => (Err(Status::from(e)), None, None),
                    None => (Err(Status::unavailable("the decoding worker stopped mid-request")), None, None),
                };
                let failed = event.is_err();
                if tx.send(event).await.is_err() {
                    // The caller went away. What it was sent stays annotatable;
                    // dropping `generation` then frees the decoding slots.
                    let partial = generation.cancelled(&done, sent);
                    if let Err(e) = generation.record(&state, [done, partial].concat()).await {
                        tracing::warn!(error = %e, "could not log a cancelled GenerateStream");
                    }
                    return;
                }
                if failed {
                    return;
                }
                if let Some((id, text)) = delta {
                    sent.entry(id).or_default().push_str(&text);
                }
                if let Some(finished) = finished {
                    sent.remove(&finished.candidate_id);
                    done.push(finished);
                }
            }
            let last = match generation.record(&state, done).await {
                Ok((_, timings)) => Ok(GenerateEvent { event: Some(generate_event::Event::Done(timings)) }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn submit_annotation(
        &self,
        request: Request<SubmitAnnotationRequest>,
    ) -> Result<Response<SubmitAnnotationResponse>, Status> {
        let caller = request.extensions().get::<crate::keys::Caller>().cloned();
        let tenant = tenancy::of(&request);
        if let Some(annotation) = &request.get_ref().annotation {
            tenancy::check_declared(&request, "annotation.tenant", &annotation.tenant)?;
        }
        let annotation = request.into_inner().annotation.ok_or_else(|| Error::invalid("annotation", "is required"))?;
        if let Some(agent) = caller.as_ref().and_then(|c| c.agent.as_ref())
            && &annotation.agent_id != agent
        {
            return Err(Error::PermissionDenied(format!(
                "annotation.agent_id {:?}: this API key belongs to agent {agent:?}, and annotates only as that agent",
                annotation.agent_id
            ))
            .into());
        }
        let annotation_id = annotation.annotation_id.clone();
        let accepted = self.state.annotations.submit(&tenant, annotation).await?;
        Ok(Response::new(SubmitAnnotationResponse {
            annotation_id,
            duplicate: accepted.duplicate,
            log_sequence: accepted.sequence,
            annotation_delay: prost_types::Duration::try_from(accepted.delay).ok(),
        }))
    }
}
