//! SupportService: the copilot calls and agents' feedback. Until a model
//! engine is loaded, Retrieve, Rank and Generate validate their input (and
//! the ids it refers to) and answer UNAVAILABLE naming the missing model.

use std::{pin::Pin, sync::Arc};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{AppState, convert};
use crate::{
    error::{Error, Result},
    kb::KbError,
    proto::{
        GenerateEvent, GenerateRequest, GenerateResponse, InteractionKind, RankRequest, RankResponse, RetrieveRequest,
        RetrieveResponse, SubmitAnnotationRequest, SubmitAnnotationResponse, generate_request::Grounding,
        rank_request::Candidates, support_service_server::SupportService,
    },
};

pub struct Support {
    state: Arc<AppState>,
}

impl Support {
    pub fn new(state: Arc<AppState>) -> Self {
        Support { state }
    }

    fn check_knowledge_exist(&self, field: &str, ids: &[String]) -> Result<()> {
        for (i, id) in ids.iter().enumerate() {
            self.state.kb.get(id, 0, false).map_err(|e| match e {
                KbError::NotFound(_) | KbError::Deleted { .. } => Error::NotFound(format!("{field}[{i}]: {e}")),
                other => other.into(),
            })?;
        }
        Ok(())
    }

    fn check_interaction(&self, field: &str, id: &str, kinds: &[InteractionKind]) -> Result<()> {
        let shown = self
            .state
            .interactions
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("{field}: interaction {id:?} is unknown to this server")))?;
        if !kinds.contains(&shown.kind) {
            return Err(Error::invalid(
                field,
                format!(
                    "interaction {id:?} is a {:?} interaction; expected {kinds:?}",
                    shown.kind
                ),
            ));
        }
        Ok(())
    }

    fn check_generate(&self, req: &GenerateRequest) -> Result<()> {
        convert::check_generate(req)?;
        match &req.grounding {
            Some(Grounding::KnowledgeIds(ids)) => self.check_knowledge_exist("knowledge_ids.ids", &ids.ids)?,
            Some(Grounding::GroundingInteractionId(id)) => self.check_interaction(
                "grounding_interaction_id",
                id,
                &[InteractionKind::Retrieve, InteractionKind::Rank],
            )?,
            None => {}
        }
        Ok(())
    }
}

fn missing_model(call: &str, model: &str) -> Error {
    Error::Unavailable(format!(
        "{call} needs a {model} and none is loaded in this server; configure one and restart, then retry"
    ))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SupportService for Support {
    async fn retrieve(&self, request: Request<RetrieveRequest>) -> Result<Response<RetrieveResponse>, Status> {
        convert::check_retrieve(request.get_ref())?;
        Err(missing_model("Retrieve", "embedding model").into())
    }

    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        let req = request.get_ref();
        convert::check_rank(req)?;
        match &req.candidates {
            Some(Candidates::KnowledgeIds(ids)) => self.check_knowledge_exist("knowledge_ids.ids", &ids.ids)?,
            Some(Candidates::RetrieveInteractionId(id)) => {
                self.check_interaction("retrieve_interaction_id", id, &[InteractionKind::Retrieve])?
            }
            _ => {}
        }
        Err(missing_model("Rank", "ranker (cross-encoder) or embedding model").into())
    }

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        self.check_generate(request.get_ref())?;
        Err(missing_model("Generate", "generator (decoder LLM)").into())
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(&self, request: Request<GenerateRequest>) -> Result<Response<EventStream>, Status> {
        self.check_generate(request.get_ref())?;
        Err(missing_model("Generate", "generator (decoder LLM)").into())
    }

    async fn submit_annotation(
        &self,
        request: Request<SubmitAnnotationRequest>,
    ) -> Result<Response<SubmitAnnotationResponse>, Status> {
        let annotation = request
            .into_inner()
            .annotation
            .ok_or_else(|| Error::invalid("annotation", "is required"))?;
        let annotation_id = annotation.annotation_id.clone();
        let accepted = self.state.annotations.submit(annotation).await?;
        Ok(Response::new(SubmitAnnotationResponse {
            annotation_id,
            duplicate: accepted.duplicate,
            log_sequence: accepted.sequence,
            annotation_delay: prost_types::Duration::try_from(accepted.delay).ok(),
        }))
    }
}
